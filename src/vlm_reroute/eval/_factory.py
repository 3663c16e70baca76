"""A method from a :class:`~vlm_reroute.eval.spec.MethodSpec`, for one model and one image size.

Budgets (``tier`` / ``ratio``) are solved for the image's visual-token count with the decision layers
that the method uses by default for this model's depth (``vlm_reroute.budget.solver``). An image with
no more tokens than the budget runs unreduced; a budget outside the range that the schedule shape
reaches for an image of that size is moved to the nearest reachable avg_T (reroute keeps at most
``[n, n, n/2, n/4, ...]``, and every schedule carries all tokens before its first decision). The cost
log records what ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..budget import ModelShape, stage_counts
from ..budget.solver import _rule, default_layers, solve_schedule
from .spec import MethodSpec

if TYPE_CHECKING:
    from ..methods import TokenReduction


def build_method(spec: MethodSpec, shape: ModelShape, n_visual: int) -> TokenReduction | None:
    """The method to apply (``None`` for vanilla) for images of ``n_visual`` tokens on ``shape``."""
    from ..methods import FastV, PDrop

    if spec.method == "none":
        return None
    if spec.keep is not None:
        if spec.method == "fastv" and not spec.reroute:
            if len(spec.layers) != 1:
                raise ValueError(
                    f"FastV makes one decision; got layers={list(spec.layers)} (use method=pdrop for several)"
                )
            return FastV(layer=spec.layers[0], keep=spec.keep[0])
        return PDrop(layers=list(spec.layers), keep=list(spec.keep), reroute=spec.reroute)
    target = spec.tier if spec.tier is not None else spec.ratio * n_visual
    if target >= n_visual:
        return None  # the image has no more tokens than the budget: nothing to reduce

    low, high = reachable_avg_t(spec, shape.num_layers, n_visual)
    solved = solve_schedule(
        shape,
        n_visual,
        spec.method,
        spec.reroute,
        target_avg_t=min(max(target, low), high),
        layers=spec.layers,
    )
    return solved.to_method()


def reachable_avg_t(spec: MethodSpec, num_layers: int, n_visual: int) -> tuple[float, float]:
    """The avg_T range the schedule shape of ``spec`` spans for images of ``n_visual`` tokens."""
    layers = spec.layers or default_layers(spec.method, num_layers, spec.reroute)
    rule = _rule(spec.method, spec.reroute, n_visual, len(layers))
    return tuple(  # type: ignore[return-value]
        sum(stage_counts(num_layers, n_visual, layers, rule(a))) / num_layers for a in (1, n_visual)
    )
