"""What kind of call a forward of the routed model is, and the state it keeps.

Every forward is one of: a routed **prefill** (a prompt with images on an empty cache), a
**decode** step on a routed cache of this block, or a **vanilla** call (text only). The state of a
call lives in its :class:`Call`, held per thread (:class:`CallState`), never on the executor, so
threads sharing one routed model do not see each other's decisions or caches. A ``generate()`` in
progress on the thread is a :class:`Generation`: where its prompt ends and the decisions its first
prefill made.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from .cache import RoutedCache
from .compat import cache_argument
from .prefill import Prefill, mask2d, start_prefill

if TYPE_CHECKING:
    from .executor import RoutingExecutor


@dataclass
class Generation:
    """A ``generate()`` call in progress on this thread.

    It exists because assisted generation, prompt lookup and ``use_cache=False`` send more than the
    prompt in one forward: the executor decides from the prompt alone, and later prefills of the same
    call reuse the first one's decisions.

    Attributes
    ----------
    prompt_length : int
        Where the prompt ends.
    decided : list of Tensor or None
        Once the first routed prefill has decided: per stage, the ``(B, prompt_length)`` bool
        decisions that later prefills of the same call reuse.
    """

    prompt_length: int
    decided: list[torch.Tensor] | None = None


class CallMode(StrEnum):
    """What a routed forward is (a vanilla call has no mode: ``None``).

    A ``StrEnum`` so that messages which name the mode (``compiled.SKIPPED_HOOKS``) print
    ``prefill``/``decode``.
    """

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class Call:
    """One forward of the routed model and the state it keeps.

    It exists so that a forward's state lives in one object held per thread, never on the executor:
    threads sharing a routed model do not see each other's decisions or caches.

    Attributes
    ----------
    mode : CallMode or None
        ``None`` for a vanilla call (text only, or no routing needed).
    prefill : Prefill or None
        A routed prefill's state.
    cache : RoutedCache or None
        The routed cache this call fills or continues.
    mask2d : Tensor or None
        A decode step's 2-D attention mask.
    decode_masks : dict
        A decode step's masks, per stage (built once per stage).
    layers_run : int
        Layer hooks that ran (code compiled before the block skips them).
    """

    mode: CallMode | None = None
    prefill: Prefill | None = None
    cache: RoutedCache | None = None
    mask2d: torch.Tensor | None = None
    decode_masks: dict[int, Any] = field(default_factory=dict)
    layers_run: int = 0


class CallState(threading.local):
    """Per thread: the call in progress and the ``generate()`` it belongs to.

    A ``threading.local``, so that each thread sees only its own (see :class:`Call`).
    """

    def __init__(self) -> None:
        self.call: Call | None = None
        self.generation: Generation | None = None


def locate_visual(
    executor: RoutingExecutor, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(tokens, visual)`` of a call, None when there is neither ``input_ids`` nor ``inputs_embeds``.

    From ``input_ids``; with ``inputs_embeds`` alone, from ``mm_token_type_ids`` when given (the
    tokens are then a stand-in: the image token id on image positions, -1 elsewhere). Embeddings
    that carry no such locator are refused: merged image features cannot be told from text.
    """
    adapter = executor.adapter
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None:
        return input_ids, adapter.visual_mask(input_ids)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        return None
    visual = adapter.visual_mask_from_types(kwargs)
    if visual is None:
        with_pixels = " (with pixel_values)" if kwargs.get("pixel_values") is not None else ""
        raise ValueError(
            f"inputs_embeds without input_ids{with_pixels}: vlm-reroute cannot locate the image tokens, "
            "and routing needs input_ids (or mm_token_type_ids, 1 on image tokens) to find them; pass "
            "input_ids, or call the model outside the block for text-only embeddings"
        )
    tokens = torch.where(visual, adapter.image_token_id, -1)
    return tokens, visual


def classify(executor: RoutingExecutor, call: Call, args: tuple, kwargs: dict) -> None:
    """Fill ``call`` with its mode and state, or raise if routing cannot be exact."""
    past = cache_argument(kwargs, executor.cache_keyword)
    past_len = past.get_seq_length() if isinstance(past, Cache) else 0
    if isinstance(past, RoutedCache) and past_len > 0:
        if not past.owned_by(executor) or past.routing is None:
            raise RuntimeError(past.refusal())
        if kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs"):
            raise ValueError(
                "new images on top of a routed KV cache are not supported: run the whole prompt "
                "with its images in one prefill"
            )
        call.mode, call.cache, call.mask2d = CallMode.DECODE, past, mask2d(kwargs)
        return
    located = locate_visual(executor, args, kwargs)
    if located is None:
        if kwargs.get("pixel_values") is not None:
            raise ValueError("routing needs input_ids to find the image tokens")
        return
    tokens, visual = located
    generation = executor.calls.generation
    prompt_length = (
        min(generation.prompt_length, visual.shape[1]) if generation is not None else visual.shape[1]
    )
    if prompt_length < visual.shape[1]:
        visual = visual.clone()
        visual[:, prompt_length:] = False  # a draft equal to the image token id is text
    if not bool(visual.any()):
        return  # a text-only prompt runs the untouched model
    if past_len > 0:
        raise ValueError(
            f"a prompt with images on a cache that already holds {past_len} tokens: routing "
            "starts from an empty cache (one prefill per prompt)"
        )
    if past is not None and type(past) not in (DynamicCache, RoutedCache):
        raise ValueError(
            f"a KV cache of type {type(past).__name__}: routing supports DynamicCache "
            "(the default), whose layers may hold different lengths"
        )
    missing = (~visual.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"samples {missing} of the batch have no image tokens: every sample of a routed batch "
            "needs at least one image (run text-only prompts in their own batch)"
        )
    reuse = generation.decided if generation is not None else None
    call.prefill = start_prefill(
        executor.adapter, executor.plan.counts, tokens, visual, kwargs, prompt_length, reuse
    )
    call.mode = CallMode.PREFILL
