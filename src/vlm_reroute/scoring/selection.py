"""Vectorised token bookkeeping: per-image top-k and compact layouts. No loops over tokens."""

from __future__ import annotations

import torch


def compact_index(mask: torch.Tensor, filler: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``mask`` (``(B, N)`` bool) per row, ascending, left-filled to a common length.

    Returns ``index`` ``(B, L)`` with ``filler`` in the unused left slots and ``valid`` ``(B, L)``.
    Keeping the original order keeps causality; left filling keeps every row's last token last.
    """
    batch, n = mask.shape
    counts = mask.sum(dim=1)
    length = int(counts.max())
    if bool((counts == length).all()):  # the common case: no filler needed, no sort
        index = mask.nonzero()[:, 1].view(batch, length)
        return index, torch.ones_like(index, dtype=torch.bool)
    positions = torch.arange(n, device=mask.device).expand_as(mask)
    ranked = torch.where(mask, positions, torch.full_like(positions, -1))
    index = ranked.sort(dim=1).values[:, n - length :]
    valid = index >= 0
    return torch.where(valid, index, torch.full_like(index, filler)), valid


def top_k_per_image(
    scores: torch.Tensor, candidates: torch.Tensor, image_ids: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Bool ``(B, N)``: for every image, its ``counts[image]`` best-scoring candidates.

    ``image_ids`` is ``-1`` off images and numbers images in sequence order, so the visual tokens
    in row-major order are grouped by image. Ties go to the earlier token (stable sort) on both
    paths, so a sample decides the same alone or in any batch. Callers make sure each image has at
    least ``counts[image]`` candidates.
    """
    visual = image_ids >= 0
    rows, cols = visual.nonzero(as_tuple=True)
    group = image_ids[rows, cols]
    score = torch.where(candidates[rows, cols], scores[rows, cols].float(), float("-inf"))
    sizes = torch.bincount(group, minlength=counts.numel())
    chosen = torch.zeros_like(score, dtype=torch.bool)
    if bool((sizes == sizes[0]).all()) and bool((counts == counts[0]).all()):
        # equal images (LLaVA, fixed-resolution Qwen): one row-wise sort of an (images, tokens) view
        per_image = score.view(counts.numel(), int(sizes[0]))
        picked = per_image.argsort(dim=1, descending=True, stable=True)[:, : int(counts[0])]
        chosen.view_as(per_image).scatter_(1, picked, True)
    else:
        order = score.argsort(descending=True, stable=True)
        order = order[group[order].argsort(stable=True)]
        starts = sizes.cumsum(0) - sizes
        sorted_group = group[order]
        rank = torch.arange(order.numel(), device=order.device) - starts[sorted_group]
        chosen[order] = rank < counts[sorted_group]
    selected = torch.zeros_like(visual)
    selected[rows, cols] = chosen
    return selected
