"""Nüwa stage 1, separation and alignment: spatially even anchors from a salience map.

Nüwa (arXiv 2602.02951) tiles an image's token grid into non-overlapping 2×2 cells, lets every
cell propose its ``n`` most salient tokens (separation), and keeps the ``k1`` most salient of these
candidates as *anchors*, in raster order (alignment). Odd grids are padded to even on the bottom and
right (the release's Qwen2.5-VL rule) and anchors that land on padding are dropped, so an image can
end up with fewer than ``k1`` anchors. See ``docs/nuwa-stage1.md`` and ``nuwa.md`` §1.2, §1.3, §3.1.

Everything here is batched over images of one grid (no loop over tokens); images of different grids
go through :func:`select_anchors_per_image`, which batches each grid once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Anchors:
    """Anchors of a batch of images of one ``grid`` ``(H, W)``.

    ``index`` ``(B, K)``: raster indices ``row * W + col`` into the unpadded grid, ascending; rows
    with fewer than ``K`` anchors end with the filler ``H * W`` (so every row stays sorted).
    ``valid`` ``(B, K)``: ``index < H * W``.
    """

    index: torch.Tensor
    valid: torch.Tensor
    grid: tuple[int, int]

    @property
    def counts(self) -> torch.Tensor:
        """Long ``(B,)``: anchors per image."""
        return self.valid.sum(dim=1)

    def per_image(self) -> list[torch.Tensor]:
        """The valid anchors of every image, one 1-D tensor each."""
        return [row[: int(n)] for row, n in zip(self.index, self.counts, strict=True)]


def padded_grid(height: int, width: int) -> tuple[int, int]:
    """The grid rounded up to even sides, as the 2×2 cells need (``nuwa.md`` §3.1)."""
    return height + height % 2, width + width % 2


def candidate_count(height: int, width: int, n_per_cell: int) -> int:
    """``|C|``: candidates the 2×2 cells of the *padded* grid propose (padding counted, as released)."""
    ph, pw = padded_grid(height, width)
    return (ph // 2) * (pw // 2) * n_per_cell


def qwen_anchor_count(height: int, width: int, ratio: float, n_per_cell: int) -> int:
    """The Qwen2.5-VL release's ``K₁ = min(ceil(N · s₁), |C|)`` with ``N = H · W`` (``nuwa.md`` §3.1).

    The product is taken in Python floats as released (``math.ceil(391 * 0.6) = 235``).
    Anchors on padding are dropped afterwards, so an image may keep fewer.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r}: the stage-1 keep ratio s₁ must be in (0, 1]")
    _check_n(n_per_cell)
    return min(math.ceil(height * width * ratio), candidate_count(height, width, n_per_cell))


def _check_n(n_per_cell: int) -> None:
    if isinstance(n_per_cell, bool) or not isinstance(n_per_cell, int) or not 1 <= n_per_cell <= 4:
        raise ValueError(f"n_per_cell={n_per_cell!r}: a 2×2 cell proposes 1, 2, 3 or 4 candidates")


def _k1_per_image(k1: int | Sequence[int] | torch.Tensor, batch: int, limit: int) -> torch.Tensor:
    k = torch.as_tensor(k1, dtype=torch.long).flatten()
    if k.numel() == 1:
        k = k.expand(batch)
    if k.numel() != batch:
        raise ValueError(f"k1 has {k.numel()} entries for {batch} images: give one int or one per image")
    if bool((k < 1).any()) or bool((k > limit).any()):
        raise ValueError(
            f"k1={k.tolist()}: each image needs 1 ≤ k1 ≤ {limit} (the candidates its 2×2 cells propose)"
        )
    return k


def select_anchors(
    salience: torch.Tensor, n_per_cell: int, k1: int | Sequence[int] | torch.Tensor
) -> Anchors:
    """Separation and alignment for ``salience`` ``(B, H, W)`` (higher = more salient, finite).

    Each 2×2 cell of the grid (padded to even sides) proposes its top ``n_per_cell`` tokens; the top
    ``k1`` candidates (an int, or one per image) become anchors, sorted into raster order; anchors on
    padding are dropped. ``n_per_cell = 4`` makes every token a candidate: plain global top-``k1``
    (the release's ``REGION`` off ablation). Ties go to the earlier raster position, inside a cell
    and globally, so an image decides the same alone or in any batch.

    Padding is ``-inf``, not the release's zeros: the two give the same anchors whenever real
    salience is positive (attention probabilities are), and ``-inf`` never lets padding displace a
    real token that ties at zero.
    """
    if salience.ndim != 3 or salience.shape[1] < 1 or salience.shape[2] < 1:
        raise ValueError(f"salience has shape {tuple(salience.shape)}: expected (images, H, W) with H, W ≥ 1")
    _check_n(n_per_cell)
    batch, height, width = salience.shape
    if not bool(torch.isfinite(salience).all()):
        raise ValueError("salience has NaN or infinite entries: every token needs a finite score")
    k = _k1_per_image(k1, batch, candidate_count(height, width, n_per_cell)).to(salience.device)
    ph, pw = padded_grid(height, width)
    score = F.pad(salience.float(), (0, pw - width, 0, ph - height), value=float("-inf"))
    real = F.pad(
        torch.ones(batch, height, width, dtype=torch.bool, device=salience.device),
        (0, pw - width, 0, ph - height),
        value=False,
    )
    # (B, cells_h, cells_w, 4): the four tokens of a cell in raster order
    cells = score.view(batch, ph // 2, 2, pw // 2, 2).permute(0, 1, 3, 2, 4).reshape(batch, -1, 4)
    local = cells.argsort(dim=-1, descending=True, stable=True)[..., :n_per_cell]
    proposed = torch.zeros_like(cells, dtype=torch.bool).scatter_(-1, local, True)
    proposed = proposed.view(batch, ph // 2, pw // 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(batch, -1)
    candidate = proposed & real.view(batch, -1)
    key = torch.where(candidate, score.view(batch, -1), float("-inf"))
    width_k = int(k.max())
    chosen = key.argsort(dim=1, descending=True, stable=True)[:, :width_k]  # padded-grid raster index
    keep = torch.minimum(k, candidate.sum(dim=1))  # fewer when padding held some of the top k1
    valid = torch.arange(width_k, device=salience.device) < keep[:, None]
    raster = (chosen // pw) * width + chosen % pw
    index = torch.where(valid, raster, height * width).sort(dim=1).values
    return Anchors(index=index, valid=index < height * width, grid=(height, width))


def select_anchors_per_image(
    saliences: Sequence[torch.Tensor], n_per_cell: int, k1: int | Sequence[int]
) -> list[torch.Tensor]:
    """:func:`select_anchors` for images of different grids: ``saliences[i]`` is ``(H_i, W_i)``.

    Images of one grid are selected in one batched call. Returns each image's anchors (1-D, sorted).
    """
    k1s = [k1] * len(saliences) if isinstance(k1, int) else list(k1)
    if len(k1s) != len(saliences):
        raise ValueError(
            f"k1 has {len(k1s)} entries for {len(saliences)} images: give one int or one per image"
        )
    out: list[torch.Tensor | None] = [None] * len(saliences)
    for members in group_by_shape([s.shape for s in saliences]).values():
        anchors = select_anchors(
            torch.stack([saliences[i] for i in members]), n_per_cell, [k1s[i] for i in members]
        )
        for i, row in zip(members, anchors.per_image(), strict=True):
            out[i] = row
    return out  # type: ignore[return-value]


def group_by_shape(shapes: Sequence[Sequence[int]]) -> dict[tuple[int, ...], list[int]]:
    """Image indices grouped by shape, in first-seen order (images of one grid run batched)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return groups
