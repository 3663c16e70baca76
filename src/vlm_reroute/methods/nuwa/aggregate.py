"""Nüwa stage 1, aggregation ("region cohesion"): weak anchors absorb similar, nearby tokens.

For every anchor ``p`` and token ``j`` of its image (Nüwa, arXiv 2602.02951; ``nuwa.md`` §1.4, §3.1):

    w_pj = relu(cos(F_p, F_j)) · max(0, 1 − ‖u_p − u_j‖₂ / τ)

with ``F`` the similarity features and ``u`` grid coordinates in token units. A selective gate keeps
the anchors whose salience is at least the ``q``-quantile ``θ`` of the anchors' salience (linear
interpolation, as ``torch.quantile``) unchanged, bit for bit; the others replace their feature with a
``w``-weighted sum over *all* tokens of the image (anchors and discarded tokens alike).

Only the rows of the anchors that aggregate are built — ``(low anchors) × N``, never ``N × N``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .select import Anchors, group_by_shape, padded_grid, select_anchors

#: How a low anchor's row of weights becomes its feature (``docs/nuwa-stage1.md``):
#: ``"convex"`` (the fix, default): self weight 1, row divided by its sum; a convex combination.
#: ``"release_llava"``: row (self weight included) divided by its sum + 1e-8, then the self weight
#: overwritten with 1.0; total weight 2 − 1/Z ∈ [1, 2) (``nuwa.md`` §1.4 step 4, the release's quirk).
#: ``"release_qwen"``: row with the computed self weight relu(cos(F_p, F_p)) divided by its sum + 1e-8.
WEIGHTINGS = ("convex", "release_llava", "release_qwen")
EPS = 1e-8  # the release's normaliser guard


def llava_tau(dist_sq: float = 280.0) -> float:
    """LLaVA-1.5's kernel radius ``τ = √DIST`` in patches (``DIST = 280``: τ ≈ 16.7, ``nuwa.md`` §1.4)."""
    if not dist_sq > 0:
        raise ValueError(f"dist_sq={dist_sq!r}: the squared kernel radius must be > 0")
    return math.sqrt(dist_sq)


def qwen_tau(height: int, width: int, scale: float = 0.8) -> float:
    """The windowed-ViT release's radius (Qwen2.5-VL): ``scale`` × the diagonal of the even-padded grid
    (``nuwa.md`` §3.1)."""
    ph, pw = padded_grid(height, width)
    return scale * math.sqrt((ph - 1) ** 2 + (pw - 1) ** 2)


@dataclass(frozen=True)
class Aggregated:
    """Stage-1 output for a batch of images of one grid.

    ``features`` ``(B, K, D)``: one feature per anchor slot (zeros on invalid slots); ``anchors``:
    the :class:`Anchors` they belong to; ``aggregated`` ``(B, K)``: the anchors that absorbed others
    (below the gate); ``threshold`` ``(B,)``: the gate ``θ`` per image (float32).
    """

    features: torch.Tensor
    anchors: Anchors
    aggregated: torch.Tensor
    threshold: torch.Tensor


def gate(salience: torch.Tensor, anchors: Anchors, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(θ, high)``: the ``quantile`` of each image's anchor salience and the anchors at or above it.

    ``salience`` ``(B, N)``. Quantile 0 makes every anchor high (nothing aggregates); quantile 1
    leaves only the most salient anchor (and any tie with it) high.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"gate quantile={quantile!r}: must be in [0, 1]")
    n = salience.shape[1]
    score = salience.float().gather(1, anchors.index.clamp(max=n - 1))
    theta = torch.nanquantile(score.masked_fill(~anchors.valid, float("nan")), quantile, dim=1)
    return theta, (score >= theta[:, None]) & anchors.valid


def _first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``mask`` ``(B, K)`` per row, first-filled to the widest row, and their validity."""
    counts = mask.sum(dim=1)
    width = int(counts.max())
    pos = (~mask).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
    return pos, torch.arange(width, device=mask.device) < counts[:, None]


def aggregate(
    features: torch.Tensor,
    similarity: torch.Tensor,
    salience: torch.Tensor,
    anchors: Anchors,
    tau: float,
    gate_quantile: float,
    weighting: str = "convex",
) -> Aggregated:
    """Region cohesion for images of one grid (``nuwa.md`` §1.4 steps 1–5, §3.1 "Aggregation").

    ``features`` ``(B, N, D)``: what the anchors carry on (LLaVA: the CLIP feature before the
    projector; Qwen: the merged embedding); ``similarity`` ``(B, N, Ds)``: the features the cosine is
    taken on; ``salience`` ``(B, N)``; all in raster order of ``anchors.grid``. Weights are formed in
    float32 and cast to ``features.dtype`` for the weighted sum, as released.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: allowed are {', '.join(WEIGHTINGS)}")
    if not tau > 0:
        raise ValueError(f"tau={tau!r}: the kernel radius must be > 0")
    height, width = anchors.grid
    batch, n, dim = features.shape
    if n != height * width or similarity.shape[:2] != (batch, n) or salience.shape != (batch, n):
        raise ValueError(
            f"features {tuple(features.shape)}, similarity {tuple(similarity.shape)} and salience "
            f"{tuple(salience.shape)} must all cover the {height}×{width} grid of {batch} images"
        )
    theta, high = gate(salience, anchors, gate_quantile)
    index = anchors.index.clamp(max=n - 1)
    out = features.gather(1, index[..., None].expand(-1, -1, dim))  # high anchors: bit for bit
    out = out.masked_fill(~anchors.valid[..., None], 0)
    low = anchors.valid & ~high
    if not bool(low.any()):
        return Aggregated(out, anchors, low, theta)
    slot, slot_valid = _first(low)  # (B, L): positions in K of the anchors that aggregate
    rows = index.gather(1, slot)  # their raster indices
    weights = _weights(similarity, rows, (height, width), tau, weighting)  # (B, L, N)
    mixed = torch.bmm(weights.to(features.dtype), features)
    # invalid slots write into a spare column that is dropped
    slot = torch.where(slot_valid, slot, out.shape[1])
    spare = torch.cat([out, out.new_zeros(batch, 1, dim)], dim=1)
    spare.scatter_(1, slot[..., None].expand(-1, -1, dim), mixed)
    return Aggregated(spare[:, :-1], anchors, low, theta)


def _weights(
    similarity: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int], tau: float, weighting: str
) -> torch.Tensor:
    """Normalised float32 weights ``(B, L, N)`` of the anchors at raster ``rows`` ``(B, L)``."""
    height, width = grid
    unit = F.normalize(similarity.float(), p=2, dim=-1)
    cos = torch.bmm(unit.gather(1, rows[..., None].expand(-1, -1, unit.shape[-1])), unit.transpose(1, 2))
    n = height * width
    grid_row = (torch.arange(n, device=rows.device) // width).float()
    grid_col = (torch.arange(n, device=rows.device) % width).float()
    # integer offsets, so the distance is exact; in place to hold few (B, L, N) buffers at once
    dist = (rows // width).float()[..., None].sub(grid_row).square_()
    dist.add_((rows % width).float()[..., None].sub(grid_col).square_()).sqrt_()
    kernel = dist.div_(tau).clamp_(max=1.0).neg_().add_(1.0)  # 1 − min(d/τ, 1), as released
    weights = cos.relu_().mul_(kernel)
    self_col = rows[..., None]
    if weighting == "convex":
        weights.scatter_(2, self_col, 1.0)
        return weights.div_(weights.sum(dim=-1, keepdim=True))
    weights.div_(weights.sum(dim=-1, keepdim=True) + EPS)
    if weighting == "release_llava":
        weights.scatter_(2, self_col, 1.0)
    return weights


@dataclass(frozen=True)
class ImageStage1:
    """Stage 1 of one image: ``anchors`` (1-D raster indices, sorted), their ``features``
    ``(K, D)``, which of them ``aggregated`` (bool ``(K,)``) and the gate ``threshold``."""

    anchors: torch.Tensor
    features: torch.Tensor
    aggregated: torch.Tensor
    threshold: float


def run_stage1(
    features: Sequence[torch.Tensor],
    similarity: Sequence[torch.Tensor],
    salience: Sequence[torch.Tensor],
    n_per_cell: int,
    k1: int | Sequence[int],
    tau: float | Sequence[float],
    gate_quantile: float,
    weighting: str = "convex",
) -> list[ImageStage1]:
    """Separation, alignment and aggregation for images of any grids, one batched pass per grid.

    Per image ``i``: ``features[i]`` ``(N_i, D)``, ``similarity[i]`` ``(N_i, Ds)`` and
    ``salience[i]`` ``(H_i, W_i)`` with ``N_i = H_i · W_i``; ``k1`` and ``tau`` one value or one per
    image (images of one grid must share ``tau``).
    """
    count = len(salience)
    k1s = [k1] * count if isinstance(k1, int) else list(k1)
    taus = [float(tau)] * count if isinstance(tau, (int, float)) else [float(t) for t in tau]
    if not len(features) == len(similarity) == len(k1s) == len(taus) == count:
        raise ValueError(
            f"{len(features)} features, {len(similarity)} similarity maps, {count} salience maps, "
            f"{len(k1s)} k1 and {len(taus)} tau values: give one per image"
        )
    out: list[ImageStage1 | None] = [None] * count
    for members in group_by_shape([s.shape for s in salience]).values():
        group_tau = {taus[i] for i in members}
        if len(group_tau) != 1:
            raise ValueError(f"images {members} share a grid but have radii {sorted(group_tau)}: give one")
        anchors = select_anchors(
            torch.stack([salience[i] for i in members]), n_per_cell, [k1s[i] for i in members]
        )
        result = aggregate(
            torch.stack([features[i] for i in members]),
            torch.stack([similarity[i] for i in members]),
            torch.stack([salience[i].flatten() for i in members]),
            anchors,
            group_tau.pop(),
            gate_quantile,
            weighting,
        )
        for row, i in enumerate(members):
            k = int(anchors.counts[row])
            out[i] = ImageStage1(
                anchors=anchors.index[row, :k],
                features=result.features[row, :k],
                aggregated=result.aggregated[row, :k],
                threshold=float(result.threshold[row]),
            )
    return out  # type: ignore[return-value]
