"""Where a routed prefill's time goes, for ``speed.py``: torch's operator table and the router's own parts.

Kept apart from the experiments because it patches the engine's functions with timing wrappers for
the duration of one measurement (restored afterwards); nothing else in the benchmark does that.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from pathlib import Path
from statistics import median
from typing import Any

import torch

import vlm_reroute.engine.decide as decide
import vlm_reroute.engine.executor as executor
import vlm_reroute.engine.masks as masks
import vlm_reroute.engine.prefill as prefill
from vlm_reroute.methods import TokenReduction
from vlm_reroute.scoring.attention import LastTokenAttention

__all__ = ["ROUTER_PARTS", "router_breakdown", "torch_profile"]


def torch_profile(model: torch.nn.Module, inputs: dict, method: TokenReduction | None, path: Path) -> None:
    """Top operators (self CPU time) of one warm prefill: where the time goes."""
    call = {"use_cache": True, "logits_to_keep": 1}
    with torch.no_grad():
        for _ in range(2):
            with method(model) if method else nullcontext():
                model(**inputs, **call)
        with method(model) if method else nullcontext(), torch.profiler.profile() as prof:
            model(**inputs, **call)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    path.write_text(table)


# The router's own functions, timed by wrapping them for the duration of one measurement (the engine's
# files are untouched; the wrappers are removed afterwards). Top level first: the hooks contain the rest.
ROUTER_PARTS = {
    "hooks (all router work)": (
        executor.RoutingExecutor,
        ("_before_call", "_before_layer", "_after_last_layer", "_after_call"),
    ),
    "decision": (decide.Decider, ("decide",)),
    "  scoring (gathers + last-token attention)": (decide.Decider, ("score",)),
    "    last-token attention (norm, K/Q proj, RoPE, softmax)": (LastTokenAttention, ("score",)),
    "      RMSNorm of keys + query": None,  # inside the scorer: see _scorer_parts
    "      K projection (all keys)": None,
    "      Q projection (one row)": None,
    "      RoPE (keys + query)": None,
    "  top_k_per_image": (prefill, ("top_k_per_image",)),
    "  compact_index": (prefill, ("compact_index",)),
    "  stage_mask": (masks, ("stage_mask",)),
    "  record (trace)": (prefill.Prefill, ("record",)),
    "  full_view (scatter into the buffer)": (prefill.Prefill, ("full_view",)),
}


def _scorer_parts(score: Any, spent: dict[str, float], timed: Any) -> Any:
    """Times the norm, projections and RoPE inside one scoring call, by hooks that live only during it
    (the layer's own forward is never timed)."""
    labels = [label for label, part in ROUTER_PARTS.items() if part is None]

    @functools.wraps(score)
    def wrapper(scorer: Any, ctx: Any) -> Any:
        handles, starts = [], {}
        layer, adapter = ctx.layer, ctx.adapter
        modules = (layer.input_layernorm, layer.self_attn.k_proj, layer.self_attn.q_proj)
        for label, module in zip(labels[:3], modules, strict=True):

            def pre(mod: Any, args: Any, label: str = label) -> None:
                starts[label] = time.perf_counter()

            def post(mod: Any, args: Any, out: Any, label: str = label) -> None:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - starts[label]

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        adapter.apply_rope = timed(labels[3], type(adapter).apply_rope.__get__(adapter))
        try:
            return score(scorer, ctx)
        finally:
            del adapter.apply_rope
            for h in handles:
                h.remove()

    return wrapper


def router_breakdown(model: torch.nn.Module, inputs: dict, method: TokenReduction, runs: int = 8) -> dict:
    """Milliseconds per routed prefill spent in each router function (medians over ``runs``)."""
    spent: dict[str, float] = {}
    originals = []

    def timed(label: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        return wrapper

    for label, part in ROUTER_PARTS.items():
        for name in part[1] if part else ():
            originals.append((part[0], name, getattr(part[0], name)))
            setattr(part[0], name, timed(label, getattr(part[0], name)))
    timed_score = LastTokenAttention.score  # already wrapped for its own total above
    LastTokenAttention.score = _scorer_parts(timed_score, spent, timed)  # restored with the originals
    call = {"use_cache": True, "logits_to_keep": 1}
    per_run: list[dict[str, float]] = []
    totals = []
    try:
        with torch.no_grad():
            for i in range(runs + 2):
                spent.clear()
                with method(model):
                    start = time.perf_counter()
                    model(**inputs, **call)
                    total = time.perf_counter() - start
                if i >= 2:  # warm-up
                    totals.append(total)
                    per_run.append(dict(spent))
    finally:
        for owner, name, fn in reversed(originals):
            setattr(owner, name, fn)
    ms = {label: median(r.get(label, 0.0) for r in per_run) * 1e3 for label in ROUTER_PARTS}
    return {"method": repr(method), "prefill_ms": median(totals) * 1e3, "router_ms": ms}
