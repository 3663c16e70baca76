"""The ideal routed prefill: what a zero-overhead router would take on the machine it runs on.

A routed prefill does the vanilla work outside the decoder (vision tower, embedding, final norm,
head) plus every decoder layer on its own token count. Both parts are measured here rather than
modelled: :class:`SpanTimer` times the decoder-layer span of a vanilla prefill (the rest is
"outside"), and :class:`LayerTimer` runs each decoder layer alone on the inputs the model would
give it at a given length (its hidden states, RoPE cos/sin, the mask ``create_causal_mask`` builds,
a fresh ``DynamicCache``). The difference between a measured routed prefill and
``outside + Σ_j layer_j(n_j)`` is the router's own cost (scoring, top-k, gathers, masks).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from statistics import median
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

from ..adapters import adapter_for
from ..engine.compat import CACHE_KEYWORDS, cache_keyword, mask_cache_keyword
from .measure import sync

__all__ = ["LayerTimer", "SpanTimer", "layer_times"]


class SpanTimer:
    """Times the decoder-layer span (first layer entered → last layer left) of each forward.

    ``outside = total prefill − span`` is the vanilla work a router cannot remove; it exists so
    that the ideal prefill (module docstring) is measured rather than modelled. Two hooks, a few
    microseconds per forward; installed only around vanilla runs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = adapter_for(model).layers
        self.device = next(model.parameters()).device
        self.start = self.end = 0.0
        self.handles: list[Any] = []

    def __enter__(self) -> SpanTimer:
        def first(*_: Any) -> None:
            sync(self.device)
            self.start = time.perf_counter()

        def last(*_: Any) -> None:
            sync(self.device)
            self.end = time.perf_counter()

        self.handles = [
            self.layers[0].register_forward_pre_hook(first),
            self.layers[len(self.layers) - 1].register_forward_hook(last),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @property
    def span(self) -> float:
        return self.end - self.start


class LayerTimer:
    """Runs decoder layers alone on ``n`` tokens, with the inputs the model itself would build.

    It exists to time what a zero-overhead router would cost per layer. The layer inputs (hidden
    states, RoPE, position ids) are captured from one real vanilla prefill (:meth:`capture`) and
    cut to each length, so every family (1-D RoPE, MRoPE, GQA) is served by its own code. The mask
    is rebuilt for each length by ``create_causal_mask`` with the model's config, as the decoder
    does; a hybrid decoder's linear-attention layers (``adapter.recurrent_layers``, Qwen3.5) get the
    2-D padding mask ``create_recurrent_attention_mask`` builds for them instead. Each pass uses a
    fresh ``DynamicCache``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.adapter = adapter_for(model)
        self.layers = self.adapter.layers
        self.cache_keyword = cache_keyword(model, list(self.layers))
        self.device = next(model.parameters()).device
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}
        self.mask2d: torch.Tensor | None = None
        self.recurrent = frozenset(self.adapter.recurrent_layers)
        self._prepared: dict[tuple[int, bool], tuple[torch.Tensor, dict[str, Any]]] = {}

    def capture(self, model: nn.Module, inputs: dict[str, Any], **call_kwargs: Any) -> None:
        """Record what the first decoder layer receives in a vanilla prefill of ``inputs``."""

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.hidden = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            skip = ("hidden_states", *CACHE_KEYWORDS)
            self.kwargs = {k: v for k, v in kwargs.items() if k not in skip}

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs, **call_kwargs)
        finally:
            handle.remove()
        mask = inputs.get("attention_mask")
        self.mask2d = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self._prepared.clear()

    @property
    def max_tokens(self) -> int:
        return self._captured().shape[1]

    def _captured(self) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError("LayerTimer: call capture(model, inputs) first")
        return self.hidden

    def inputs_for(self, n: int, recurrent: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """Hidden states ``(B, n, D)`` and layer kwargs (without the cache) for ``n`` tokens, for an
        attention layer or (``recurrent``) a linear-attention one."""
        if not 1 <= n <= self.max_tokens:
            raise ValueError(f"n={n}: layer inputs exist for 1..{self.max_tokens} tokens")
        if (n, recurrent) in self._prepared:
            return self._prepared[n, recurrent]
        hidden = self._captured()[:, -n:].contiguous()
        kwargs = {}
        for key, value in self.kwargs.items():
            if key == "position_embeddings":
                value = tuple(t[..., -n:, :].contiguous() for t in value)
            elif key == "position_ids" and isinstance(value, torch.Tensor):
                value = value[..., -n:].contiguous()
            kwargs[key] = value
        mask2d = self.mask2d[:, -n:] if self.mask2d is not None else None
        config = self.adapter.text_config
        if recurrent:
            kwargs["attention_mask"] = create_recurrent_attention_mask(config, hidden, mask2d)
        else:
            kwargs["attention_mask"] = create_causal_mask(
                config=config,
                inputs_embeds=hidden,
                attention_mask=mask2d,
                position_ids=None,
                **{mask_cache_keyword(): DynamicCache(config=config)},
            )
        kwargs["use_cache"] = True
        self._prepared[n, recurrent] = (hidden, kwargs)
        return self._prepared[n, recurrent]

    def time_pass(self, tokens_per_layer: Sequence[int]) -> list[float]:
        """Seconds of layer ``j`` alone on ``tokens_per_layer[j]`` tokens, for every layer in order.

        Running the layers in model order (each with its own weights) keeps the cache and memory
        traffic of a real prefill; timing one layer in a loop would keep its weights hot.
        """
        if len(tokens_per_layer) != len(self.layers):
            raise ValueError(f"{len(tokens_per_layer)} token counts for {len(self.layers)} layers")
        prepared = [self.inputs_for(int(n), j in self.recurrent) for j, n in enumerate(tokens_per_layer)]
        cache = {self.cache_keyword: DynamicCache(config=self.adapter.text_config)}
        times = []
        with torch.no_grad():
            for layer, (hidden, kwargs) in zip(self.layers, prepared, strict=True):
                sync(self.device)
                start = time.perf_counter()
                layer(hidden, **cache, **kwargs)
                sync(self.device)
                times.append(time.perf_counter() - start)
        return times


def layer_times(
    model: nn.Module, inputs: dict[str, Any], counts: Sequence[int], repeats: int = 3
) -> dict[int, float]:
    """Median seconds of one decoder pass through every layer at ``n`` tokens, divided per layer.

    A quick standalone look at how layer time scales with the token count (the profiler uses
    :class:`LayerTimer` per schedule instead).
    """
    timer = LayerTimer(model)
    timer.capture(model, inputs, use_cache=True)
    num_layers = len(timer.layers)
    out = {}
    for n in counts:
        timer.time_pass([n] * num_layers)  # warm-up
        out[int(n)] = median(sum(timer.time_pass([n] * num_layers)) for _ in range(repeats)) / num_layers
    return out
