"""The routing executor: prune and reroute, written once and shared by every method.

It hooks the model (never patches classes) and keeps the state of one prefill:

* a full-length buffer ``(B, N + 1, D)`` holding every token's latest hidden state (the extra
  slot absorbs the writes of batch fillers); deferred tokens keep their carried state there;
* the current stage's compact layout: ``index`` ``(B, L)`` into the buffer, in original order.

At a decision layer the previous stage is scattered into the buffer, the candidates are scored
and the top k per image selected, and the new kept set is gathered once; every layer of the
stage then runs on it with gathered RoPE (original positions, gaps included) and a stage mask.
The last layer's output is scattered back so the model head sees the usual full sequence. A
layer's KV cache therefore holds exactly the tokens that went through it; while decoding, each
stage attends over its own cache with a mask of the right length.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from ..adapters.base import ModelAdapter
from ..scoring.base import Scorer, ScoringContext
from .layout import ImageLayout
from .masks import stage_mask
from .selection import compact_index, top_k_per_image
from .trace import Decision, Trace


@dataclass(frozen=True)
class Plan:
    """A method as the executor runs it: decision layers, per-image keep counts, the scorer.

    ``keep_counts(n)`` gives the count of every stage for an image of ``n`` visual tokens (a fixed
    schedule resolved, or a budget target solved for that size).
    """

    layers: tuple[int, ...]
    reroute: bool
    keep_counts: Callable[[int], tuple[int, ...]]
    scorer: Scorer

    def counts(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per stage: ``(n_images,)`` keep counts for images of ``sizes`` tokens."""
        per_image = [self.keep_counts(int(n)) for n in sizes.tolist()]
        return [
            torch.tensor([c[i] for c in per_image], dtype=torch.long, device=sizes.device)
            for i in range(len(self.layers))
        ]


@dataclass
class _Prefill:
    """State of one routed prefill (rebuilt for every prompt with images)."""

    input_ids: torch.Tensor  # (B, N)
    visual: torch.Tensor  # (B, N) bool
    image_ids: torch.Tensor  # (B, N) long, -1 off images
    layouts: list[list[ImageLayout]]
    counts: list[torch.Tensor]  # per stage: (n_images,) keep counts
    valid: torch.Tensor  # (B, N + 1) bool: not padding (the extra slot is False)
    last: torch.Tensor  # (B,) index of each sample's last non-padding token
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # full (cos, sin), (B, N, head_dim)
    position_ids: torch.Tensor | None = None
    cache: Cache | None = None
    buffer: torch.Tensor | None = None
    index: torch.Tensor | None = None  # current compact layout, None before the first decision
    present: torch.Tensor | None = None  # visual tokens selected at the last decision
    stage_kwargs: dict[str, Any] = field(default_factory=dict)
    key_masks: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first layer, (B, L))
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # decision layer -> scores

    @property
    def n(self) -> int:
        return self.visual.shape[1]

    @property
    def batch_index(self) -> torch.Tensor:
        return torch.arange(self.visual.shape[0], device=self.visual.device)

    def rows(self) -> torch.Tensor:
        """``(B, 1)`` batch index for advanced indexing with a ``(B, L)`` layout."""
        return self.batch_index[:, None]


def _mask2d(kwargs: dict) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)}: routing needs a 2-D (batch, length) mask"
        )
    return mask


class RoutingExecutor:
    """Installs the hooks of one applied method and runs its plan on every forward."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, plan: Plan, trace: Trace) -> None:
        self.model, self.adapter, self.plan, self.trace = model, adapter, plan, trace
        self.decision_of = {layer: i for i, layer in enumerate(plan.layers)}
        self.score_ahead = (
            {layer - 1: layer for layer in plan.layers} if plan.scorer.score_from == "previous" else {}
        )
        self.first_decision = plan.layers[0]
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.mode: str | None = None  # "prefill", "decode" or None (vanilla)
        self.state: _Prefill | None = None  # the prefill being run, or the one being decoded
        # every cache a routed prefill filled in this block, with the layouts its decoding needs
        self.routed: weakref.WeakKeyDictionary[Cache, _Prefill] = weakref.WeakKeyDictionary()
        self.decode_mask2d: torch.Tensor | None = None
        self.decode_masks: dict[int, Any] = {}
        self.inside_call = False

    # ---- installation -------------------------------------------------------------------
    def install(self) -> None:
        reg = self.handles.append
        reg(self.model.register_forward_pre_hook(self._before_call, with_kwargs=True))
        reg(self.model.register_forward_hook(self._after_call, with_kwargs=True, always_call=True))
        reg(self.adapter.decoder.register_forward_pre_hook(self._before_decoder))
        layers = self.adapter.layers
        for i, layer in enumerate(layers):
            reg(layer.register_forward_pre_hook(partial(self._before_layer, i), with_kwargs=True))
        reg(layers[len(layers) - 1].register_forward_hook(self._after_last_layer))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.routed.clear()
        self.state, self.mode = None, None

    # ---- model-level hooks: what kind of call is this? -----------------------------------
    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inside_call = True
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        past_len = past.get_seq_length() if isinstance(past, Cache) else 0
        self.mode, self.decode_masks, self.state = None, {}, None
        if isinstance(past, Cache) and past in self.routed and past_len > 0:
            if kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs"):
                raise ValueError(
                    "new images on top of a routed KV cache are not supported: run the whole prompt "
                    "with its images in one prefill"
                )
            self.mode, self.decode_mask2d, self.state = "decode", _mask2d(kwargs), self.routed[past]
            return
        if input_ids is None:
            if kwargs.get("pixel_values") is not None:
                raise ValueError(
                    "routing needs input_ids to find the image tokens; got inputs_embeds with pixel_values"
                )
            return
        visual = self.adapter.visual_mask(input_ids)
        if not bool(visual.any()):
            return  # a text-only prompt runs the untouched model
        if past_len > 0:
            raise ValueError(
                f"a prompt with images on a cache that already holds {past_len} tokens: routing "
                "starts from an empty cache (one prefill per prompt)"
            )
        if past is not None and type(past) is not DynamicCache:
            raise ValueError(
                f"past_key_values of type {type(past).__name__}: routing supports DynamicCache "
                "(the default), whose layers may hold different lengths"
            )
        missing = (~visual.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"samples {missing} of the batch have no image tokens: every sample of a routed batch "
                "needs at least one image (run text-only prompts in their own batch)"
            )
        self.state = self._new_prefill(input_ids, visual, kwargs)
        self.mode = "prefill"

    def _new_prefill(self, input_ids: torch.Tensor, visual: torch.Tensor, kwargs: dict) -> _Prefill:
        image_ids = self.adapter.image_ids(input_ids, kwargs)
        layouts = self.adapter.image_layouts(image_ids, kwargs)
        sizes = torch.bincount(image_ids[visual])
        counts = self.plan.counts(sizes)
        mask = _mask2d(kwargs)
        valid = mask.bool() if mask is not None else torch.ones_like(visual)
        positions = torch.arange(visual.shape[1], device=visual.device)
        last = (valid.long() * (positions + 1)).argmax(dim=1)
        valid = nn.functional.pad(valid, (0, 1), value=False)
        return _Prefill(
            input_ids=input_ids,
            visual=visual,
            image_ids=image_ids,
            layouts=layouts,
            counts=counts,
            valid=valid,
            last=last,
        )

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.inside_call = False
        st = self.state
        if self.mode == "prefill" and st is not None and output is not None:  # None: the call raised
            # keep only what decoding needs: the stages' key masks
            st.buffer = st.rope = st.position_ids = st.index = None
            st.pending, st.stage_kwargs = {}, {}
            if st.cache is not None:
                self.routed[st.cache] = st
            self.trace.prefills += 1
        self.mode, self.decode_masks, self.state = None, {}, None

    def _before_decoder(self, module: nn.Module, args: tuple) -> None:
        if not self.inside_call:
            raise RuntimeError(
                f"inside a vlm-reroute block, call the model the method was applied to "
                f"({type(self.model).__name__}), not its decoder: the decoder alone cannot be routed"
            )

    # ---- layer hooks ------------------------------------------------------------------------
    def _before_layer(self, i: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self.mode is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.mode == "decode":
            if i < self.first_decision:
                return None
            kwargs["attention_mask"] = self._decode_mask(i, hidden)
            return args, kwargs
        st = self.state
        if i == 0:
            self._capture(st, hidden, kwargs)
        if i in self.decision_of:
            hidden = self._decide(i, layer, hidden)
        if i in self.score_ahead:
            decision = self.score_ahead[i]
            candidates = self._candidates(st)
            st.pending[decision] = self._score(i, decision, layer, self._full_view(hidden), candidates)
        if st.index is None:
            return None
        kwargs.update(st.stage_kwargs)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _after_last_layer(self, layer: nn.Module, args: tuple, output: Any) -> Any:
        if self.mode != "prefill" or self.state is None or self.state.index is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = self._full_view(hidden)[:, : self.state.n]
        return (full, *output[1:]) if isinstance(output, tuple) else full

    # ---- prefill mechanics ----------------------------------------------------------------
    def _capture(self, st: _Prefill, hidden: torch.Tensor, kwargs: dict) -> None:
        batch, n = hidden.shape[:2]
        cos, sin = kwargs["position_embeddings"]
        st.rope = (cos.expand(batch, n, -1), sin.expand(batch, n, -1))
        pos = kwargs.get("position_ids")
        st.position_ids = pos.expand(batch, n) if isinstance(pos, torch.Tensor) and pos.ndim == 2 else None
        st.cache = kwargs.get("past_key_values")

    def _full_view(self, hidden: torch.Tensor) -> torch.Tensor:
        """Write the current hidden states into the full buffer and return it ``(B, N + 1, D)``."""
        st = self.state
        if st.buffer is None:
            st.buffer = hidden.new_zeros(hidden.shape[0], st.n + 1, hidden.shape[2])
        if st.index is None:
            st.buffer[:, : st.n] = hidden
        else:
            st.buffer[st.rows(), st.index] = hidden
            st.buffer[:, st.n] = 0  # the filler slot: keep it finite
        return st.buffer

    def _candidates(self, st: _Prefill) -> torch.Tensor:
        """Reroute: every visual token competes; prune: only those kept at the last decision."""
        if self.plan.reroute or st.present is None:
            return st.visual
        return st.present

    def _score(
        self, i: int, decision: int, layer: nn.Module, full: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``(B, N)`` from the method's scorer at layer ``i`` for the decision at ``decision``."""
        st = self.state
        ctx = ScoringContext(
            adapter=self.adapter,
            layer=layer,
            layer_idx=i,
            decision=decision,
            hidden=full,
            keys=st.valid[:, : st.n] & (~st.visual | candidates),
            candidates=candidates,
            visual=st.visual,
            image_ids=st.image_ids,
            valid=st.valid,
            last=st.last,
            rope=st.rope,
            input_ids=st.input_ids,
            layouts=st.layouts,
        )
        return self.plan.scorer.score(ctx)

    def _decide(self, i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        st = self.state
        stage = self.decision_of[i]
        full = self._full_view(hidden)
        candidates = self._candidates(st)
        scores = st.pending.pop(i, None)
        if scores is None:
            scores = self._score(i, i, layer, full, candidates)
        selected = top_k_per_image(scores, candidates, st.image_ids, st.counts[stage])
        self._record(i, stage, scores, selected)
        st.present = selected
        index, filled = compact_index(~st.visual | selected, filler=st.n)
        st.index = index
        rows, rope_index = st.rows(), index.clamp(max=st.n - 1)
        key_mask = filled & st.valid[rows, index]
        st.key_masks.append((i, key_mask))
        cos, sin = st.rope
        st.stage_kwargs = {
            "attention_mask": stage_mask(
                self.adapter.text_config, key_mask, index.shape[1], st.cache, i, hidden.dtype
            ),
            "position_embeddings": (cos[rows, rope_index], sin[rows, rope_index]),
        }
        if st.position_ids is not None:
            st.stage_kwargs["position_ids"] = st.position_ids[rows, rope_index]
        return full[rows, index]

    def _record(self, i: int, stage: int, scores: torch.Tensor, selected: torch.Tensor) -> None:
        st = self.state
        if stage == 0:
            self.trace.decisions = []
            self.trace.visual_tokens = st.visual.sum(dim=1).tolist()
            self.trace.layouts = st.layouts
        previous = st.present
        # one device-to-host copy per decision, then split per sample
        rank = (st.visual.cumsum(dim=1) - 1)[selected].cpu()
        picked = list(rank.split(selected.sum(dim=1).tolist()))
        score_rows = list(scores[st.visual].detach().float().cpu().split(st.visual.sum(dim=1).tolist()))
        if previous is None:
            reentered = [0] * selected.shape[0]
        else:
            reentered = (selected & ~previous).sum(dim=1).tolist()
        self.trace.decisions.append(
            Decision(layer=i, selected=picked, scores=score_rows, reentered=reentered)
        )

    # ---- decoding -------------------------------------------------------------------------------
    def _decode_mask(self, i: int, hidden: torch.Tensor) -> Any:
        """The mask of layer ``i``'s stage for this decode step: its cache plus the new tokens."""
        st = self.state
        stage = max(s for s, (first, _) in enumerate(st.key_masks) if first <= i)
        if stage not in self.decode_masks:
            first, key_mask = st.key_masks[stage]
            query = hidden.shape[1]
            kv_length = st.cache.get_seq_length(first) + query
            tail = kv_length - key_mask.shape[1]
            if self.decode_mask2d is not None:
                new = self.decode_mask2d[:, -tail:].to(device=key_mask.device, dtype=torch.bool)
            else:
                new = key_mask.new_ones(key_mask.shape[0], tail)
            self.decode_masks[stage] = stage_mask(
                self.adapter.text_config,
                torch.cat([key_mask, new], dim=1),
                query,
                st.cache,
                first,
                hidden.dtype,
            )
        return self.decode_masks[stage]
