"""The scorer protocol: how a decision ranks its candidate visual tokens.

In the spirit of kvpress's ``ScorerPress.score``: the executor hands a scorer everything it may
read at a decision (the hidden states entering the scoring layer, the layer, the adapter, the
layout and the candidates) and takes back one score per token; it then keeps the top k per image
itself. A method owns its scorer; family knowledge (projections, norms, rotary) stays in adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..kinds import ScoreFrom

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..adapters.base import ModelAdapter
    from ..adapters.layout import ImageLayout


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer may read at one decision, in full-sequence coordinates ``(B, N, ...)``.

    ``hidden`` holds every token's latest state: kept tokens as they enter ``layer``, deferred
    tokens (reroute) with the state they carried. ``keys`` marks the tokens present at this
    decision (text and candidates, no padding); ``candidates`` the visual tokens competing.
    ``last`` is each sample's last non-padding position; ``rope`` the ``(cos, sin)`` of every
    token at its original position.
    """

    adapter: ModelAdapter
    layer: nn.Module
    layer_idx: int
    decision: int
    hidden: torch.Tensor
    keys: torch.Tensor
    candidates: torch.Tensor
    visual: torch.Tensor
    image_ids: torch.Tensor
    valid: torch.Tensor
    last: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    input_ids: torch.Tensor
    layouts: list[list[ImageLayout]]


@runtime_checkable
class Scorer(Protocol):
    """Returns float scores ``(B, N)``; only the entries of ``ctx.candidates`` are read.

    ``score_from`` is :attr:`ScoreFrom.CURRENT` (called with the decision layer itself) or
    :attr:`ScoreFrom.PREVIOUS` (called with layer ``l - 1`` and its input, for a decision at ``l``:
    FastV's convention); a scorer written elsewhere may hold the plain string ``"current"`` or
    ``"previous"``, which the executor reads as the enum.
    """

    score_from: ScoreFrom

    def score(self, ctx: ScoringContext) -> torch.Tensor: ...


def scores_from(scorer: Scorer) -> ScoreFrom:
    """``scorer.score_from`` as the enum (a scorer written elsewhere may hold the plain string); any
    other value is refused here rather than silently scored at the decision layer itself."""
    score_from = ScoreFrom.of(scorer.score_from)
    if score_from is None:
        raise ValueError(
            f"{type(scorer).__name__}(score_from={scorer.score_from!r}): allowed are 'current' and 'previous'"
        )
    return score_from
