"""Scores for a decision that keeps every candidate: no ranking to do, so nothing is computed.

A stage-1 method alone (VisionZip, arXiv 2412.04467; DivPrune, arXiv 2503.02175) keeps what entered
through the decoder: its schedule has pass-through decisions, which the budget solver needs (one
decision layer at least) and which keep every candidate (``methods/stage1.py``). Ranking the
candidates there would only spend time (an attention row per decision) to select all of them. This
scorer gives each candidate 1 and everything else 0, which the top-k of a keep-everything decision
selects exactly as it would select from any scores; the trace shows the decision keeping all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kinds import ScoreFrom
from .base import ScoringContext


@dataclass(frozen=True)
class PassThrough:
    """1 for every candidate, 0 otherwise: for decisions whose counts keep every candidate."""

    score_from: ScoreFrom = ScoreFrom.CURRENT

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        return ctx.candidates.float()
