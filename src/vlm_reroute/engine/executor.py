"""The routing executor: prune and reroute, written once and shared by every method.

It hooks the model (never patches classes). Each forward is classified (``calls.py``: prefill,
decode or vanilla) and keeps its own state in a per-thread :class:`~.calls.Call`; a prefill's
state (``prefill.py``) holds:

* a full-length buffer ``(B, N + 1, D)`` holding every token's latest hidden state (the extra
  slot absorbs the writes of batch fillers); deferred tokens keep their carried state there;
* the current stage's compact layout: ``index`` ``(B, L)`` into the buffer, in original order.

At a decision layer the previous stage is scattered into the buffer, the candidates are scored
and the top k per image selected, and the new kept set is gathered once; every layer of the
stage then runs on it with gathered RoPE (original positions, gaps included) and a stage mask.
The last layer's output is scattered back so the model head sees the usual full sequence. A
layer's KV cache therefore holds exactly the tokens that went through it; the prefill turns the
cache into a :class:`~.cache.RoutedCache` holding the stage layouts, and decode steps
(``decode.py``) attend, per stage, over its own cache with a mask of the right length. The trace
is replaced only when a prefill completes.

A plan with a vision-side stage (Nüwa's stage 1, ``vision.py``) applies it at layer 0 as an
irreversible stage 0: only text and the tokens it kept exist from there on, later decisions choose
among those, and the cache reports the full sequence length to ``transformers``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_recurrent_attention_mask

from ..adapters.base import ModelAdapter
from ..scoring.base import Scorer, ScoringContext
from ..scoring.selection import compact_index, top_k_per_image
from .cache import Routing, claim
from .calls import Call, CallState, classify
from .compat import cache_argument, check_internals
from .compiled import SKIPPED_HOOKS
from .decode import decode_mask
from .generation import GenerateGuard
from .masks import stage_mask
from .prefill import Prefill
from .trace import Decision, Trace
from .vision import Reports, VisionStage, forget_logical_length, report_logical_length, stage_zero


@dataclass(frozen=True)
class Plan:
    """A method as the executor runs it: decision layers, per-image keep counts, the scorer.

    ``keep_counts(n)`` gives the count of every stage for an image of ``n`` visual tokens (a fixed
    schedule resolved, or a budget target solved for that size). ``method`` names it in messages.
    With a ``vision`` stage each image's counts come from its report at layer 0, and the decisions
    choose among the tokens it kept.
    """

    method: str
    layers: tuple[int, ...]
    reroute: bool
    keep_counts: Callable[[int], tuple[int, ...]]
    scorer: Scorer
    vision: VisionStage | None = None

    def counts(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per stage: ``(n_images,)`` keep counts for images of ``sizes`` tokens."""
        if self.vision is not None:  # placeholders: the vision stage reports them at layer 0
            return [torch.zeros_like(sizes) for _ in self.layers]
        per_image = [self.keep_counts(int(n)) for n in sizes.tolist()]
        return [
            torch.tensor([c[i] for c in per_image], dtype=torch.long, device=sizes.device)
            for i in range(len(self.layers))
        ]


class RoutingExecutor:
    """Installs the hooks of one applied method and runs its plan on every forward.

    The executor holds only what every call shares (model, plan, trace); each call's state lives
    in its :class:`~.calls.Call`, per thread, so concurrent calls on one model are independent.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, plan: Plan, trace: Trace) -> None:
        self.model, self.adapter, self.plan, self.trace = model, adapter, plan, trace
        self.cache_keyword = check_internals(model, list(adapter.layers))
        self.decision_of = {layer: i for i, layer in enumerate(plan.layers)}
        self.score_ahead = (
            {layer - 1: layer for layer in plan.layers} if plan.scorer.score_from == "previous" else {}
        )
        self.first_decision = 0 if plan.vision is not None else plan.layers[0]
        adapter.check_plan(plan.layers, plan.scorer.score_from)
        self.recurrent = frozenset(adapter.recurrent_layers)  # linear attention: no KV, a 2-D mask
        self.reports = Reports() if plan.vision is not None else None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.calls = CallState()
        self.active = False
        self._commit_lock = threading.Lock()
        self._generate: GenerateGuard | None = None

    # ---- installation -------------------------------------------------------------------
    def install(self) -> None:
        reg = self.handles.append
        reg(self.model.register_forward_pre_hook(self._before_call, with_kwargs=True))
        reg(self.model.register_forward_hook(self._after_call, with_kwargs=True, always_call=True))
        reg(self.adapter.decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True))
        layers = self.adapter.layers
        for i, layer in enumerate(layers):
            reg(layer.register_forward_pre_hook(partial(self._before_layer, i), with_kwargs=True))
        for i in self.adapter.addition_layers:
            reg(layers[i].register_forward_hook(partial(self._add_after_layer, i)))
        reg(layers[len(layers) - 1].register_forward_hook(self._after_last_layer))
        if self.plan.vision is not None:
            self.handles += self.plan.vision.install(self.model, self.reports.add)
        self._generate = GenerateGuard(self)
        self._generate.install()
        self.active = True

    def remove(self) -> None:
        self.active = False
        if self._generate is not None:
            self._generate.remove()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.reports is not None:
            self.reports.clear()

    def serves(self, cache: Cache) -> bool:
        """True when the call running on this thread fills or continues ``cache``."""
        call = self.calls.call
        return self.active and call is not None and call.cache is cache

    # ---- model-level hooks: what kind of call is this? -----------------------------------
    @torch.compiler.disable
    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:  # a stale hook kept by code compiled in an earlier block
            return
        call = self.calls.call = Call()
        classify(self, call, args, kwargs)

    @torch.compiler.disable
    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self.calls.call = self.calls.call, None
        if call is None or call.mode is None:
            return
        if output is None:  # the call raised (always_call hooks run with no output)
            error = sys.exc_info()[1]
            if call.mode == "prefill" and error is not None:
                error.add_note(
                    "vlm-reroute: this routed prefill did not complete; the trace still shows the previous "
                    "complete prefill"
                )
            return
        if call.layers_run != len(self.adapter.layers):
            raise RuntimeError(
                SKIPPED_HOOKS.format(
                    model=type(self.model).__name__,
                    mode=call.mode,
                    ran=call.layers_run,
                    layers=len(self.adapter.layers),
                )
            )
        if call.mode == "prefill":
            self._commit(call)

    def _commit(self, call: Call) -> None:
        """A complete prefill: the cache learns its stage layouts, the trace shows its decisions."""
        st = call.prefill
        if call.cache is not None:
            call.cache._vlm_routing = Routing(self.plan.method, st.prompt_key_masks(), st.prompt_length)
            # the layer transformers reads the length from (layer 0; a hybrid decoder's first
            # full-attention layer) was shortened (stage 0, or a decision there): report the full length
            stages = [mask for first, mask in st.key_masks if first <= self.adapter.length_layer]
            if stages:
                report_logical_length(call.cache, st.n - stages[-1].shape[1])
        generation = self.calls.generation
        if generation is not None and generation.decided is None:
            generation.decided = st.selections
        if st.reuse is not None:
            return  # a re-run with decisions already recorded
        with self._commit_lock:
            self.trace.decisions = st.decisions
            self.trace.stage1 = st.stage1
            self.trace.visual_tokens = st.visual.sum(dim=1).tolist()
            self.trace.layouts = st.layouts
            self.trace.prefills += 1

    @torch.compiler.disable
    def _before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        call = self.calls.call
        if self.active and call is None:
            raise RuntimeError(
                f"inside a vlm-reroute block, call the model the method was applied to "
                f"({type(self.model).__name__}), not its decoder: the decoder alone cannot be routed"
            )
        if call is None or call.mode != "prefill":
            return None
        # inputs the decoder adds to the full sequence inside its own loop (Qwen3-VL's DeepStack)
        # are taken out here and added by _add_after_layer to the tokens that ran the layer
        call.prefill.additions = self.adapter.take_layer_additions(kwargs)
        return args, kwargs

    # ---- layer hooks ------------------------------------------------------------------------
    @torch.compiler.disable
    def _before_layer(self, i: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        call = self.calls.call
        if call is None or call.mode is None:
            return None
        call.layers_run += 1
        hidden = args[0] if args else kwargs["hidden_states"]
        if call.mode == "decode":
            if i < self.first_decision or i in self.recurrent:  # recurrent layers: the model's own mask
                return None
            kwargs["attention_mask"] = decode_mask(self.adapter.text_config, call, i, hidden)
            return args, kwargs
        st = call.prefill
        if i == 0:
            self._capture(call, hidden, kwargs)
            if self.plan.vision is not None:
                hidden = self._enter(st, hidden)
        if i in self.decision_of:
            hidden = self._decide(st, i, layer, hidden)
        if i in self.score_ahead and st.reuse is None:
            decision = self.score_ahead[i]
            candidates = self._candidates(st)
            st.pending[decision] = self._score(st, i, decision, layer, _full_view(st, hidden), candidates)
        if st.index is None:
            return None
        kwargs.update(st.stage_kwargs)
        if i in self.recurrent:
            kwargs["attention_mask"] = st.recurrent_mask
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    @torch.compiler.disable
    def _after_last_layer(self, layer: nn.Module, args: tuple, output: Any) -> Any:
        call = self.calls.call
        if call is None or call.mode != "prefill" or call.prefill.index is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = _full_view(call.prefill, hidden)[:, : call.prefill.n]
        return (full, *output[1:]) if isinstance(output, tuple) else full

    @torch.compiler.disable
    def _add_after_layer(self, i: int, layer: nn.Module, args: tuple, output: Any) -> Any:
        """Add row ``rank`` of ``additions[i]`` to each token of its mask that ran layer ``i``."""
        call = self.calls.call
        if call is None or call.mode != "prefill" or i not in call.prefill.additions:
            return None
        st = call.prefill
        mask, rows = st.additions[i]
        hidden = output[0] if isinstance(output, tuple) else output
        rank = mask.flatten().cumsum(0).view_as(mask) - 1
        if st.index is None:
            hit, ranks = mask, rank[mask]
        else:
            position = st.index.clamp(max=st.n - 1)
            hit = (st.index < st.n) & mask[st.rows(), position]
            ranks = rank[st.rows(), position][hit]
        hidden = hidden.clone()
        hidden[hit] = hidden[hit] + rows[ranks].to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # ---- prefill mechanics ----------------------------------------------------------------
    def _capture(self, call: Call, hidden: torch.Tensor, kwargs: dict) -> None:
        st = call.prefill
        batch, n = hidden.shape[:2]
        cos, sin = kwargs["position_embeddings"]
        st.rope = (cos.expand(batch, n, -1), sin.expand(batch, n, -1))
        pos = kwargs.get("position_ids")
        st.position_ids = pos.expand(batch, n) if isinstance(pos, torch.Tensor) and pos.ndim == 2 else None
        cache = cache_argument(kwargs, self.cache_keyword)
        if cache is not None:
            forget_logical_length(cache)  # a cache reused after reset() starts from its real length
        st.cache = call.cache = claim(cache, self, self.plan.method) if cache is not None else None

    def _candidates(self, st: Prefill) -> torch.Tensor:
        """Reroute: every visual token competes (every one a vision stage let in); prune: only
        those kept at the last decision."""
        if self.plan.reroute or st.present is None:
            return st.visual if st.pool is None else st.pool
        return st.present

    def _score(
        self,
        st: Prefill,
        i: int,
        decision: int,
        layer: nn.Module,
        full: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Scores ``(B, N)`` from the method's scorer at layer ``i`` for the decision at ``decision``.

        The scorer sees the prompt only (positions ``< prompt_length``): tokens after it (drafts,
        generated tokens) neither query nor serve as keys, so the decision is the prompt's own.
        """
        p = st.prompt_length
        keys = st.valid[:, :p] & (~st.visual[:, :p] | candidates[:, :p])
        ctx = ScoringContext(
            adapter=self.adapter,
            layer=layer,
            layer_idx=i,
            decision=decision,
            hidden=full if p == st.n else full[:, : p + 1],
            keys=keys,
            candidates=candidates[:, :p],
            visual=st.visual[:, :p],
            image_ids=st.image_ids[:, :p],
            valid=st.valid if p == st.n else nn.functional.pad(st.valid[:, :p], (0, 1), value=False),
            last=st.last,
            rope=(st.rope[0][:, :p], st.rope[1][:, :p]),
            input_ids=st.tokens[:, :p],
            layouts=st.layouts,
        )
        scores = self.plan.scorer.score(ctx)
        return nn.functional.pad(scores, (0, st.n - p)) if p < st.n else scores

    def _select(
        self, st: Prefill, stage: int, scores: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Top k per image; the scoring query (the prompt's last token) is never routed away: when it
        is visual it takes one of its image's slots at every decision."""
        rows = st.rows()[:, 0]
        query_visual = st.visual[rows, st.last]
        if bool(query_visual.any()):
            scores = scores.float().clone()
            scores[rows[query_visual], st.last[query_visual]] = float("inf")
        return top_k_per_image(scores, candidates, st.image_ids, st.counts[stage])

    def _decide(self, st: Prefill, i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.decision_of[i]
        full = _full_view(st, hidden)
        if st.reuse is not None:
            selected = nn.functional.pad(st.reuse[stage], (0, st.extra), value=False)
        else:
            candidates = self._candidates(st)
            scores = st.pending.pop(i, None)
            if scores is None:
                scores = self._score(st, i, i, layer, full, candidates)
            selected = self._select(st, stage, scores, candidates)
            st.decisions.append(self._decision(st, i, scores, selected))
        st.selections.append(selected[:, : st.prompt_length])
        return self._gather(st, i, full, selected, hidden.dtype)

    def _enter(self, st: Prefill, hidden: torch.Tensor) -> torch.Tensor:
        """Stage 0: from layer 0 on only text and the tokens the vision stage kept go through."""
        entry = stage_zero(self.reports, hidden, st.visual, st.image_ids, st.layouts, len(self.plan.layers))
        st.counts, st.stage1 = entry.counts, entry.records
        st.decisions.append(self._decision(st, 0, entry.scores, entry.kept))
        st.pool = entry.kept
        return self._gather(st, 0, _full_view(st, hidden), entry.kept, hidden.dtype)

    def _gather(
        self, st: Prefill, i: int, full: torch.Tensor, selected: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The compact layout of text + ``selected`` from layer ``i`` on, and its hidden states."""
        st.present = selected
        index, filled = compact_index(~st.visual | selected, filler=st.n)
        st.index = index
        rows, rope_index = st.rows(), index.clamp(max=st.n - 1)
        key_mask = filled & st.valid[rows, index]
        st.key_masks.append((i, key_mask))
        cos, sin = st.rope
        st.stage_kwargs = {
            "attention_mask": stage_mask(
                self.adapter.text_config, key_mask, index.shape[1], st.cache, self._cache_layer(i), dtype
            ),
            "position_embeddings": (cos[rows, rope_index], sin[rows, rope_index]),
        }
        if st.position_ids is not None:
            st.stage_kwargs["position_ids"] = st.position_ids[rows, rope_index]
        if self.recurrent:  # linear-attention layers zero the stage's padding and fillers themselves
            shape_only = full.new_empty(full.shape[0], index.shape[1], 0)
            st.recurrent_mask = create_recurrent_attention_mask(
                self.adapter.text_config, shape_only, key_mask.long()
            )
        return full[rows, index]

    def _cache_layer(self, first: int) -> int:
        """The first layer from ``first`` on that caches keys: a stage of a hybrid decoder may start
        at a linear-attention layer, whose cache has no length to build masks from."""
        return next((j for j in range(first, len(self.adapter.layers)) if j not in self.recurrent), first)

    @staticmethod
    def _decision(st: Prefill, i: int, scores: torch.Tensor, selected: torch.Tensor) -> Decision:
        # one device-to-host copy per decision, then split per sample
        rank = (st.visual.cumsum(dim=1) - 1)[selected].cpu()
        picked = list(rank.split(selected.sum(dim=1).tolist()))
        per_sample = st.visual.sum(dim=1).tolist()
        score_rows = list(scores[st.visual].detach().float().cpu().split(per_sample))
        previous = st.present
        if previous is None:
            reentered = [0] * selected.shape[0]
        else:
            reentered = (selected & ~previous).sum(dim=1).tolist()
        return Decision(layer=i, selected=picked, scores=score_rows, reentered=reentered)


def _full_view(st: Prefill, hidden: torch.Tensor) -> torch.Tensor:
    """Write the current hidden states into the full buffer and return it ``(B, N + 1, D)``."""
    if st.buffer is None:
        st.buffer = hidden.new_zeros(hidden.shape[0], st.n + 1, hidden.shape[2])
    if st.index is None:
        st.buffer[:, : st.n] = hidden
    else:
        st.buffer[st.rows(), st.index] = hidden
        st.buffer[:, st.n] = 0  # the filler slot: keep it finite
    return st.buffer
