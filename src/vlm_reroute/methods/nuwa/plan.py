"""Nüwa stage 1, the per-image plan: how many anchors an image keeps, from how many candidates per
2×2 cell, with which kernel radius, and the later decisions' counts (arXiv 2602.02951; ``nuwa.md``
§1.3, §3.1, §4). One image is one grid (LLaVA-1.5, the Qwen towers: :func:`plan_grid`) or several
views (the multi-view families: :func:`plan_views`, the quota and radius then decided per view in
``views.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .aggregate import qwen_tau
from .method import ImagePlan
from .select import candidate_count, padded_grid

if TYPE_CHECKING:
    from .method import Nuwa


def plan_grid(method: Nuwa, grid: tuple[int, int], shape: Any, num_layers: int) -> ImagePlan:
    """Stage 1 for a single-grid image of ``grid`` tokens (``shape``: the decoder's, for a target):
    K₁ (a fraction is clipped to the candidates, as the Qwen release's ``min(⌈N·s₁⌉, |C|)``), the
    quota per 2×2 cell (the setting's, else the fewest that give K₁) and the kernel radius."""
    height, width = grid
    n = height * width
    k1, keep, clip, preset_n, then = method.entry(n, shape, num_layers)
    if k1 > n:
        raise ValueError(
            f"{method!r}: K₁ = {k1} anchors per image, but an image of {height}×{width} = {n} tokens has "
            "fewer; give a smaller setting (k1=, budget=) or larger images"
        )
    if k1 == n:
        return ImagePlan(k1=n, n_per_cell=4, tau=math.nan, keep=keep, skip=True, then=then)
    ph, pw = padded_grid(height, width)
    cells = (ph // 2) * (pw // 2)
    n_per_cell = method.n_per_cell or preset_n or min(4, math.ceil(k1 / cells))
    limit = candidate_count(height, width, n_per_cell)
    if k1 > limit:
        if not clip:
            raise ValueError(
                f"{method!r}: K₁ = {k1} anchors per image, but the 2×2 cells of a {height}×{width} grid "
                f"propose at most {limit} candidates with n_per_cell={n_per_cell}; give a smaller budget "
                f"or k1 (≤ {limit}), or a larger n_per_cell"
            )
        k1 = limit  # the release's min(⌈N·s₁⌉, |C|)
    tau = method.settings.tau if method.settings.tau is not None else qwen_tau(height, width)
    return ImagePlan(k1=k1, n_per_cell=n_per_cell, tau=tau, keep=keep, then=then)


def plan_views(method: Nuwa, n: int, shape: Any, num_layers: int) -> ImagePlan:
    """Stage 1 for a multi-view image of ``n`` tokens (views and newlines): K₁ and the later keeps over
    the whole image (the library's per-image budget); the cell quota (0: per view, the fewest that give
    its share) and the radius (nan: per view) are decided per view."""
    k1, keep, _, preset_n, then = method.entry(n, shape, num_layers)
    if k1 > n:
        raise ValueError(
            f"{method!r}: K₁ = {k1} tokens per image, but this image has {n} (its views and newlines); "
            "give a smaller setting (k1=, budget=) or larger images"
        )
    tau = method.settings.tau
    quota = method.n_per_cell or preset_n or 0
    skip = k1 == n
    return ImagePlan(
        k1=k1, n_per_cell=quota, tau=math.nan if tau is None else tau, keep=keep, skip=skip, then=then
    )


def plan_of(method: Nuwa, n_visual: int, shape: Any, num_layers: int) -> ImagePlan:
    """An image of ``n_visual`` tokens as a budget sees it: a multi-view family's :func:`plan_views`,
    else :func:`plan_grid` of a square grid (or one row); the engine plans each image from its grid."""
    if method.views:
        return plan_views(method, n_visual, shape, num_layers)
    side = math.isqrt(n_visual)
    grid = (side, side) if side * side == n_visual else (1, n_visual)
    return plan_grid(method, grid, shape, num_layers)
