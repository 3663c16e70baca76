"""Budget-tier presets (avg_T = 192 / 128 / 64 visual tokens per image), solved on demand.

Nothing is computed at import: :func:`preset` runs the solver (cached) with the model's shipped
depth, its default visual tokens per image (576) and the default decision layers
(:func:`vlm_reroute.budget.solver.default_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from .shapes import known_models, load_model_info
from .solver import SolvedSchedule, parse_method, solve_schedule, tabulated_methods

__all__ = ["PRESET_MODELS", "TIERS", "preset", "table"]

TIERS = (192, 128, 64)
PRESET_MODELS = ("llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b", "qwen2.5-vl-3b")


def preset(model: str, tier: int, method: str, reroute: bool = False) -> SolvedSchedule:
    """The solved schedule of a registered ``method`` (e.g. ``"pdrop"``, prune or reroute) at ``tier``.

    ``model`` is any shipped name (:func:`vlm_reroute.budget.known_models`); ``tier`` one of :data:`TIERS`.
    """
    method, reroute = parse_method(method, reroute)
    if tier not in TIERS:
        raise ValueError(
            f"unknown tier {tier!r}; tiers: {', '.join(map(str, TIERS))} "
            "(use vlm_reroute.solver.solve for another avg_T)"
        )
    if model not in known_models():
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(known_models())}")
    return _preset(model, int(tier), method, reroute)


@cache
def _preset(model: str, tier: int, method: str, reroute: bool) -> SolvedSchedule:
    info = load_model_info(model)
    return solve_schedule(info.shape, info.default_visual_tokens, method, reroute, avg_t=tier)


def table(
    models: Sequence[str] = PRESET_MODELS, tiers: Sequence[int] = TIERS, n_text: int = 0
) -> list[dict[str, Any]]:
    """One row per model × tier × method × mode: layers, keep, achieved avg_T and budget ratios.

    FLOPs ratios are vs vanilla with ``n`` = ``n_text`` + visual tokens (``n_text=0``: image tokens
    only, the papers' convention); ``kv_mib`` is the KV cache of those tokens after prefill.
    """
    rows = []
    for model in models:
        shape = load_model_info(model).shape
        for tier in tiers:
            for method in tabulated_methods():
                for reroute in (False, True):
                    sched = preset(model, tier, method, reroute)
                    budget = sched.budget(shape, n_text=n_text)
                    rows.append(
                        {
                            "model": model,
                            "tier": tier,
                            "method": sched.name,
                            "layers": list(sched.layers),
                            "keep": list(sched.keep),
                            "avg_t": sched.avg_t,
                            "flops_pdrop_ratio": budget.flops_pdrop_ratio,
                            "flops_exact_ratio": budget.flops_exact_ratio,
                            "kv_mib": budget.kv_bytes / 2**20,
                        }
                    )
    return rows
