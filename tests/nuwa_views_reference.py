"""Nüwa's stage 1 on a multi-view image, for the reference (``nuwa_reference.py``): the k1 split
over views and the per-view quota (nuwa.md §4 for LLaVA-NeXT's layout; docs/methods.md for tiles).
Split from ``nuwa_reference.py``; like it, it shares no code with ``vlm_reroute``."""

from __future__ import annotations

import math

import torch
from nuwa_reference import (
    LLAVA_DIST_SQ,
    LLAVA_GATE,
    QWEN_GATE,
    QWEN_TAU_SCALE,
    aggregate_image,
    separation_and_alignment,
)

# ---- stage 1 on a multi-view image (§4 for LLaVA-NeXT's layout; docs/methods.md for tiles) ---------


def split_k1(k1: int, sizes: list[int], crops: int, anyres: bool) -> list[int]:
    """K₁ per view. ``anyres`` (§4): the base view ``K₁ // crops``, the stitched crops the rest (the
    documented fix of §4's lost remainder); tiles: in proportion to the views' cells, the leftover
    one by one to the largest remainders (ties: earlier view)."""
    from fractions import Fraction

    k = min(k1, sum(sizes))
    if anyres:
        if len(sizes) == 1:
            return [k]
        base = min(k // crops, sizes[0])
        rest = min(k - base, sizes[1])
        return [k - rest, rest]
    exact = [Fraction(k * n, sum(sizes)) for n in sizes]
    shares = [math.floor(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda v: (-(exact[v] - shares[v]), v))
    for v in order[: k - sum(shares)]:
        shares[v] += 1
    return shares


def quota_for(height: int, width: int, share: int, start: int) -> int:
    """The fewest candidates per 2×2 cell (from ``start``, at most 4: §4's auto-escalation) whose real
    (unpadded) proposals cover ``share``; counted cell by cell."""
    n = max(start, 1)
    while n < 4:
        real = 0
        for r0 in range(0, height, 2):
            for c0 in range(0, width, 2):
                inside = sum(1 for r in (r0, r0 + 1) for c in (c0, c0 + 1) if r < height and c < width)
                real += min(n, inside)
        if real >= share:
            break
        n += 1
    return n


def multi_view_stage1(
    rows, salience, similarity, views, newlines, k1, crops, anyres, clip, n_per_cell=0, weighting="convex"
):
    """One multi-view image: ``(kept token indices, rows with the aggregated anchors rewritten)``.

    ``rows`` ``(N, D)`` are what the language model receives (aggregation after the projector, as §3.1
    does after the merger); ``views``: rows × cols of each view in token order over the non-newline
    tokens; ``clip``: the LLaVA release's constants (τ = √280, gate 0.55) else the merger release's
    (τ = 0.8 × the padded view's diagonal, gate 0.1). Each view is its own grid (§4); newlines enter
    only when K₁ exceeds the cells, first ones first."""
    n = rows.shape[0]
    cells = [i for i in range(n) if i not in set(newlines.tolist())]
    if k1 >= n:
        return torch.arange(n), rows
    sizes = [h * w for h, w in views]
    shares = split_k1(k1, sizes, crops, anyres)
    out, kept, start = rows.clone(), [], 0
    for (height, width), share in zip(views, shares, strict=True):
        index = torch.tensor(cells[start : start + height * width])
        start += height * width
        if share == 0:
            continue
        if share == height * width:
            kept += index.tolist()
            continue
        grid = salience[index].view(height, width)
        quota = quota_for(height, width, share, n_per_cell)
        anchors = separation_and_alignment(grid, quota, share)
        if clip:
            tau, gate = math.sqrt(LLAVA_DIST_SQ), LLAVA_GATE
        else:
            ph, pw = height + height % 2, width + width % 2
            tau, gate = QWEN_TAU_SCALE * math.hypot(ph - 1, pw - 1), QWEN_GATE
        result = aggregate_image(rows[index], similarity[index], grid, anchors, tau, gate, weighting)
        out[index[anchors]] = result.features
        kept += index[anchors].tolist()
    kept += newlines[: max(0, k1 - len(cells))].tolist()
    return torch.tensor(sorted(kept)), out
