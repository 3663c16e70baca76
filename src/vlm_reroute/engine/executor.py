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
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..adapters.base import ModelAdapter
from ..kinds import ScoreFrom
from ..scoring.base import ScoringContext, scores_from
from .cache import claim
from .calls import Call, CallMode, CallState, classify
from .compat import cache_argument, check_internals
from .compiled import SKIPPED_HOOKS
from .decode import decode_mask
from .generation import GenerateGuard
from .masks import StageMasks
from .plan import Plan
from .prefill import Prefill
from .trace import Trace
from .vision import Reports, forget_logical_length, stage_zero


class RoutingExecutor:
    """Installs the hooks of one applied method and runs its plan on every forward.

    The executor holds only what every call shares (model, plan, trace); each call's state lives
    in its :class:`~.calls.Call`, per thread, so concurrent calls on one model are independent.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, plan: Plan, trace: Trace) -> None:
        self.model, self.adapter, self.plan, self.trace = model, adapter, plan, trace
        self.cache_keyword = check_internals(model, list(adapter.layers))
        self.decision_of = {layer: i for i, layer in enumerate(plan.layers)}
        score_from = scores_from(plan.scorer)
        ahead = score_from is ScoreFrom.PREVIOUS  # decision at l scored at l - 1
        self.score_ahead = {layer - 1: layer for layer in plan.layers} if ahead else {}
        self.first_decision = 0 if plan.vision is not None else plan.layers[0]
        adapter.check_plan(plan.layers, score_from)
        self.recurrent = frozenset(adapter.recurrent_layers)  # linear attention: no KV, a 2-D mask
        self.masks = StageMasks(adapter.text_config, len(adapter.layers), self.recurrent)
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
            if call.mode is CallMode.PREFILL and error is not None:
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
        if call.mode is CallMode.PREFILL:
            self._commit(call)

    def _commit(self, call: Call) -> None:
        """A complete prefill: the cache learns its stage layouts, the trace shows its decisions."""
        st = call.prefill
        if call.cache is not None:
            st.settle(call.cache, self.plan.method, self.adapter.length_layer)
        generation = self.calls.generation
        if generation is not None and generation.decided is None:
            generation.decided = st.selections
        if st.reuse is not None:
            return  # a re-run with decisions already recorded
        with self._commit_lock:
            st.write_trace(self.trace)

    @torch.compiler.disable
    def _before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        call = self.calls.call
        if self.active and call is None:
            raise RuntimeError(
                f"inside a vlm-reroute block, call the model the method was applied to "
                f"({type(self.model).__name__}), not its decoder: the decoder alone cannot be routed"
            )
        if call is None or call.mode is not CallMode.PREFILL:
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
        if call.mode is CallMode.DECODE:
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
            candidates = st.candidates(self.plan.reroute)
            st.pending[decision] = self._score(st, i, decision, layer, st.full_view(hidden), candidates)
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
        if call is None or call.mode is not CallMode.PREFILL or call.prefill.index is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = call.prefill.full_view(hidden)[:, : call.prefill.n]
        return (full, *output[1:]) if isinstance(output, tuple) else full

    @torch.compiler.disable
    def _add_after_layer(self, i: int, layer: nn.Module, args: tuple, output: Any) -> Any:
        """Add row ``rank`` of ``additions[i]`` to each token of its mask that ran layer ``i``."""
        call = self.calls.call
        if call is None or call.mode is not CallMode.PREFILL or i not in call.prefill.additions:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = call.prefill.add_rows(i, hidden)
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

    def _decide(self, st: Prefill, i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.decision_of[i]
        full = st.full_view(hidden)
        if st.reuse is not None:
            selected = nn.functional.pad(st.reuse[stage], (0, st.extra), value=False)
        else:
            candidates = st.candidates(self.plan.reroute)
            scores = st.pending.pop(i, None)
            if scores is None:
                scores = self._score(st, i, i, layer, full, candidates)
            selected = st.select(stage, scores, candidates)
            st.decisions.append(st.record(i, scores, selected))
        st.selections.append(selected[:, : st.prompt_length])
        return st.gather(i, full, selected, self.masks)

    def _enter(self, st: Prefill, hidden: torch.Tensor) -> torch.Tensor:
        """Stage 0: from layer 0 on only text and the tokens the vision stage kept go through."""
        entry = stage_zero(self.reports, hidden, st.visual, st.image_ids, st.layouts, len(self.plan.layers))
        st.counts, st.stage1 = entry.counts, entry.records
        st.decisions.append(st.record(0, entry.scores, entry.kept))
        st.pool = entry.kept
        return st.gather(0, st.full_view(hidden), entry.kept, self.masks)
