"""Seeded random scores: the control every ranking rule should beat (UniPruneBench, arXiv 2511.02650)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kinds import ScoreFrom
from .base import ScoringContext

_MIX = 1_000_003


@dataclass(frozen=True)
class RandomScores:
    """Uniform random scores per visual token, drawn per sample from ``seed``, the decision layer and
    the sample's own token ids (position-free, so padding does not change them): the same decisions
    every run and in any batch."""

    seed: int = 0
    score_from: ScoreFrom = ScoreFrom.CURRENT

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        valid = ctx.valid[:, : ctx.visual.shape[1]]
        order = (valid.long().cumsum(dim=1) * valid).to(torch.float64)
        ids = ctx.input_ids.to(torch.float64)
        # a per-sample fingerprint of its tokens in order (exact in float64 for any prompt length)
        fingerprint = ((ids + 1) * (order % 9973 + 1) * valid).sum(dim=1).remainder(2**31).long().tolist()
        counts = ctx.visual.sum(dim=1).tolist()
        draws = []
        for b, n in enumerate(counts):  # one generator per sample: a loop over the batch, not tokens
            gen = torch.Generator().manual_seed((self.seed * _MIX + ctx.layer_idx) * _MIX + fingerprint[b])
            draws.append(torch.rand(n, generator=gen, dtype=torch.float64))
        scores = torch.zeros(ctx.visual.shape, dtype=torch.float32, device=ctx.visual.device)
        scores[ctx.visual] = torch.cat(draws).to(device=scores.device, dtype=torch.float32)
        return scores
