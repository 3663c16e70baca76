"""``generate()`` inside a block: every mode routes exactly or is refused before its first forward.

The block wraps the model's ``generate`` (an instance attribute, removed on exit) to know, on the
thread, where the prompt ends: assisted generation and prompt lookup send the prompt and draft
tokens in one first forward, and ``use_cache=False`` re-sends prompt + generated tokens at every
step. The executor then decides from the prompt alone (see ``prefill.py``). Routed: greedy search,
sampling, beam search and beam sampling (any ``num_return_sequences``), assisted generation with a
separate draft model, prompt lookup, ``use_cache=False`` and continuing a routed cache of the same
block. Refused, with the mode named: the modes transformers 5 moved to Hub repositories
(contrastive search, DoLa, group and constrained beam search: their decoding loops run remote code
that re-runs or inspects the model in ways routing does not check), early-exit and MTP drafting
(the drafts come from the routed model's own layers), ``custom_generate``, and a cache filled
outside the block.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.generation.configuration_utils import GenerationMode

from .cache import RoutedCache
from .calls import Generation
from .compat import cache_argument

if TYPE_CHECKING:
    from .executor import RoutingExecutor

SUPPORTED = (
    "supported are greedy search and sampling, beam search and beam sampling (any "
    "num_return_sequences), assisted generation with a separate draft model (assistant_model=), "
    "prompt lookup (prompt_lookup_num_tokens=), use_cache=False, and continuing a routed cache of "
    "this block (cache=, or past_key_values= before transformers 5.24)"
)
_HUB = "transformers 5 moved it to a Hub repository whose decoding loop ({}) routing does not check"
REFUSED = {
    GenerationMode.CONTRASTIVE_SEARCH: (
        "contrastive search",
        "penalty_alpha=, top_k=",
        _HUB.format("re-runs the model on top-k candidate tokens over a reshaped cache"),
    ),
    GenerationMode.DOLA_GENERATION: (
        "DoLa",
        "dola_layers=",
        _HUB.format("reads early layers' hidden states, which a routed prefill holds compact"),
    ),
    GenerationMode.GROUP_BEAM_SEARCH: (
        "group beam search",
        "num_beam_groups=",
        _HUB.format("reorders beams group by group"),
    ),
    GenerationMode.CONSTRAINED_BEAM_SEARCH: (
        "constrained beam search",
        "constraints= / force_words_ids=",
        _HUB.format("tracks constraints over its own beam bookkeeping"),
    ),
}
_SIGNATURE = inspect.signature(GenerationMixin.generate)
_MISSING = object()


class GenerateGuard:
    """The model's ``generate`` while a method is applied: checks the mode, records the prompt length.

    The prompt length is kept on the thread for the executor. The guard exists so that every
    ``generate()`` mode either routes exactly or is refused before its first forward (the module
    docstring lists which), and so that the executor knows where the prompt ends when a forward
    carries drafts or generated tokens after it.
    """

    def __init__(self, executor: RoutingExecutor) -> None:
        self.executor = executor
        # A generative PreTrainedModel, left untyped: as nn.Module its ``generate`` reads as
        # ``Tensor | Module``, and GenerationMixin's methods take ``self`` as transformers'
        # GenerativePreTrainedModel protocol, which no model class is declared to satisfy.
        self.model: Any = executor.model
        self._previous: Any = _MISSING

    def install(self) -> None:
        model = self.model
        self._previous = model.__dict__.get("generate", _MISSING)
        original = model.generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            prompt_length = self.check(args, kwargs)
            calls = self.executor.calls
            outer, calls.generation = calls.generation, Generation(prompt_length)
            try:
                return original(*args, **kwargs)
            finally:
                calls.generation = outer

        model.__dict__["generate"] = generate

    def remove(self) -> None:
        if self._previous is _MISSING:
            self.model.__dict__.pop("generate", None)
        else:
            self.model.__dict__["generate"] = self._previous

    def check(self, args: tuple, kwargs: dict) -> int:
        """Refuse a mode routing cannot run exactly; return the prompt's length."""
        model = self.model
        if self._previous is not _MISSING:
            raise ValueError(
                f"{type(model).__name__}.generate is a custom_generate loaded with the model: it is not "
                "supported inside a vlm-reroute block, whose checks cover transformers' own modes; "
                + SUPPORTED
            )
        named = _SIGNATURE.bind(model, *args, **kwargs).arguments
        extra = dict(named.get("kwargs", {}))
        if named.get("custom_generate") is not None:
            raise ValueError(
                "generate(custom_generate=...) is not supported inside a vlm-reroute block: its decoding "
                "loop may call the model in ways routing cannot check (call the model step by step "
                f"instead: each forward is routed); {SUPPORTED}"
            )
        assistant = named.get("assistant_model")
        if assistant is model:
            raise ValueError(
                "generate(assistant_model=...) with the routed model itself as the assistant model is not "
                "supported: use a separate draft model, or prompt_lookup_num_tokens="
            )
        config, _ = model._prepare_generation_config(named.get("generation_config"), **extra)
        if config.assistant_early_exit is not None or getattr(config, "use_mtp", False):
            raise ValueError(
                "early-exit assisted generation (assistant_early_exit=, use_mtp=) is not supported inside "
                "a vlm-reroute block: its drafts come from the routed model's own layers; " + SUPPORTED
            )
        mode = config.get_generation_mode(assistant)
        if mode in REFUSED:
            name, how, why = REFUSED[mode]
            raise ValueError(
                f"{name} ({how}) is not supported inside a vlm-reroute block: {why}; {SUPPORTED}"
            )
        prompt = next(
            (
                p
                for p in (named.get("inputs"), extra.get("input_ids"), extra.get("inputs_embeds"))
                if p is not None
            ),
            None,
        )
        input_ids = prompt if prompt is not None and prompt.ndim == 2 else None
        self._check_cache(cache_argument(extra, self.executor.cache_keyword), input_ids)
        return prompt.shape[1] if prompt is not None else 0

    def _check_cache(self, past: Any, input_ids: Any) -> None:
        """A non-empty cache must be a routed cache of this block (or hold a text-only prompt)."""
        if not isinstance(past, Cache) or past.get_seq_length() == 0:
            return
        if isinstance(past, RoutedCache):
            if past.owned_by(self.executor) and past.routing is not None:
                return
            raise RuntimeError(past.refusal())
        if input_ids is None or bool(self.executor.adapter.visual_mask(input_ids).any()):
            raise ValueError(
                f"generate() with a cache (cache= / past_key_values=) holding {past.get_seq_length()} "
                "tokens that were not filled in this block: its image tokens were not routed, and the "
                "rest of the prompt would run unrouted. Routing decides once per prompt, from an empty "
                "cache: pass no cache (or an empty DynamicCache), or continue a routed cache of this block"
            )
