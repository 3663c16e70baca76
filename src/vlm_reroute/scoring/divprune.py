"""DivPrune's selection (Alvar et al., CVPR 2025, arXiv 2503.02175): a max–min diverse subset.

The Max-Min Diversity Problem on the distance ``d(i, j) = 1 − cos(x_i, x_j)`` of an image's
projected visual embeddings (the rows the language model receives) is solved greedily, as the
reference does (``methods.md`` §4): the first token is the one whose nearest neighbour is farthest,
every next one the token farthest from the selected set (the largest minimum distance to it).

Memory is linear: the reference builds the ``N × N`` distance matrix (1 GB in float32 at 16 k
tokens); here the first step reads nearest neighbours by row tiles, and the greedy keeps one
``(N,)`` vector of minimum distances, updated with one row of distances per pick (``O(k·N·d)``
compute, ``O(N)`` memory). The ``k`` picks are sequential by definition of the greedy (a loop over
picks, each one vectorised over the tokens).
"""

from __future__ import annotations

import torch

__all__ = ["TIE", "divprune_select", "nearest_distance"]

#: Two mutual nearest neighbours have the same nearest distance, which float rounding (tiles, BLAS)
#: may split either way: distances within ``TIE`` of the largest count as equal, the lower index wins.
TIE = 1e-6


def _unit(rows: torch.Tensor) -> torch.Tensor:
    x = rows.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def nearest_distance(rows: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """``(N,)`` float32: each row's cosine distance to its nearest *other* row, by tiles of ``tile``
    rows (``N = 1``: ``+inf``, no neighbour)."""
    x = _unit(rows)
    n = x.shape[0]
    out = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    for start in range(0, n, tile):  # a loop over row tiles, not tokens
        sims = x[start : start + tile] @ x.T
        rows_in_tile = torch.arange(sims.shape[0], device=x.device)
        sims[rows_in_tile, rows_in_tile + start] = float("-inf")  # not one's own neighbour
        if n > 1:
            out[start : start + tile] = 1.0 - sims.max(dim=1).values
    return out


def divprune_select(rows: torch.Tensor, k: int, tile: int = 1024) -> torch.Tensor:
    """Long ``(k,)``: the greedy max–min picks among the ``N`` rows of ``rows`` ``(N, D)``, in pick order.

    Ties go to the lower index (``argmax`` returns the first maximum; the first pick: :data:`TIE`)."""
    n = rows.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k!r}: DivPrune keeps 1..{n} tokens of an image of {n}")
    x = _unit(rows)
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    nearest = nearest_distance(rows, tile)
    picks[0] = (nearest >= nearest.max() - TIE).nonzero()[0, 0]  # mutual nearest neighbours tie
    min_distance = 1.0 - x @ x[picks[0]]
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[picks[0]] = True
    for step in range(1, k):  # the greedy: one pick per step
        picks[step] = torch.where(taken, float("-inf"), min_distance).argmax()
        taken[picks[step]] = True
        min_distance = torch.minimum(min_distance, 1.0 - x @ x[picks[step]])
    return picks
