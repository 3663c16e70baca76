"""The routing executor: prune and reroute, written once and shared by every method.

It hooks the model (never patches classes). Each forward is classified (``calls.py``: prefill,
decode or vanilla) and keeps its own state in a per-thread :class:`~.calls.Call`; a prefill's
state (``prefill.py``) holds:

* a full-length buffer ``(B, N + 1, D)`` holding every token's latest hidden state (the extra
  slot absorbs the writes of batch fillers); deferred tokens keep their carried state there;
* the current stage's compact layout: ``index`` ``(B, L)`` into the buffer, in original order.

At a decision layer (``decide.py``) the previous stage is scattered into the buffer, the
candidates are scored and the top k per image selected (or a set selector, DART's, chooses exactly
k per image itself), and the new kept set is gathered once; every layer of the stage then runs on
it with gathered RoPE (original positions, gaps included) and a stage mask. The last layer's output
is scattered back so the model head sees the usual full sequence. A
layer's KV cache therefore holds exactly the tokens that went through it; the prefill turns the
cache into a :class:`~.cache.RoutedCache` holding the stage layouts, and decode steps
(``decode.py``) attend, per stage, over its own cache with a mask of the right length. The trace
is replaced only when a prefill completes.

A plan with ``withdraw_at=K`` (VTW, arXiv 2405.05803) gathers text only at layer K: from there on no
visual token runs or is cached, under prune and reroute alike.

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
from ..scoring.base import scores_from
from .cache import claim
from .calls import Call, CallMode, CallState, classify
from .compat import cache_argument, check_internals
from .compiled import SKIPPED_HOOKS
from .decide import Decider
from .decode import decode_mask
from .generation import GenerateGuard
from .masks import StageMasks
from .plan import Plan
from .prefill import Prefill
from .trace import Trace
from .vision import Reports, forget_logical_length


class RoutingExecutor:
    """Installs the hooks of one applied method and runs its plan on every forward.

    The executor holds only what every call shares (model, plan, trace); each call's state lives
    in its :class:`~.calls.Call`, per thread, so concurrent calls on one model are independent.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, plan: Plan, trace: Trace) -> None:
        self.model, self.adapter, self.plan, self.trace = model, adapter, plan, trace
        self.cache_keyword = check_internals(model, list(adapter.layers))
        score_from = scores_from(plan.scorer)
        ahead = score_from is ScoreFrom.PREVIOUS  # decision at l scored at l - 1
        self.score_ahead = {layer - 1: layer for layer in plan.layers} if ahead else {}
        self.first_decision = 0 if plan.vision is not None else plan.layers[0]
        adapter.check_plan(plan.layers, score_from)
        self.recurrent = frozenset(adapter.recurrent_layers)  # linear attention: no KV, a 2-D mask
        self.masks = StageMasks(adapter.text_config, len(adapter.layers), self.recurrent)
        decide = getattr(plan.vision, "decide", None)  # a vision stage deciding at layer 0 (DivPrune)
        self.reports = Reports(decide=decide) if plan.vision is not None else None
        self.decider = Decider(adapter, plan, self.masks, self.reports)  # scoring, selection, gathers
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
            assert self.reports is not None  # built in __init__ for every plan with a vision stage
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
        assert st is not None  # a prefill call: classify() set its state
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
        st = call.prefill if call is not None and call.mode is CallMode.PREFILL else None
        if st is None:
            return None
        # inputs the decoder adds to the full sequence inside its own loop (Qwen3-VL's DeepStack)
        # are taken out here and added by _add_after_layer to the tokens that ran the layer
        st.additions = self.adapter.take_layer_additions(kwargs)
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
        assert st is not None  # a prefill call: classify() set its state
        if i == 0:
            self._capture(call, st, hidden, kwargs)
            self.decider.prepare(st, layer, hidden)
            if self.plan.vision is not None:
                hidden = self.decider.enter(st, hidden)
        if i in self.decider.decision_of:
            hidden = self.decider.decide(st, i, layer, hidden)
        if i == self.plan.withdraw_at:
            hidden = self.decider.withdraw(st, i, hidden)
        if i in self.score_ahead and st.reuse is None:
            decision = self.score_ahead[i]
            candidates = st.candidates(self.plan.reroute)
            full = st.full_view(hidden)
            st.pending[decision] = self.decider.choose(st, i, decision, layer, full, candidates)
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
        st = call.prefill if call is not None and call.mode is CallMode.PREFILL else None
        if st is None or st.index is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = st.full_view(hidden)[:, : st.n]
        return (full, *output[1:]) if isinstance(output, tuple) else full

    @torch.compiler.disable
    def _add_after_layer(self, i: int, layer: nn.Module, args: tuple, output: Any) -> Any:
        """Add row ``rank`` of ``additions[i]`` to each token of its mask that ran layer ``i``."""
        call = self.calls.call
        st = call.prefill if call is not None and call.mode is CallMode.PREFILL else None
        if st is None or i not in st.additions:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = st.add_rows(i, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # ---- prefill mechanics ----------------------------------------------------------------
    def _capture(self, call: Call, st: Prefill, hidden: torch.Tensor, kwargs: dict) -> None:
        batch, n = hidden.shape[:2]
        cos, sin = kwargs["position_embeddings"]
        st.rope = (cos.expand(batch, n, -1), sin.expand(batch, n, -1))
        pos = kwargs.get("position_ids")
        st.position_ids = pos.expand(batch, n) if isinstance(pos, torch.Tensor) and pos.ndim == 2 else None
        cache = cache_argument(kwargs, self.cache_keyword)
        if cache is not None:
            forget_logical_length(cache)  # a cache reused after reset() starts from its real length
        st.cache = call.cache = claim(cache, self, self.plan.method) if cache is not None else None
