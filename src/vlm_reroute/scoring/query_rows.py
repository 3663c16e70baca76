"""Attention a visual token receives from its image's text raters (SparseVLM, arXiv 2410.04417).

The score of candidate ``j`` of image ``i`` is the mean over image ``i``'s rater rows (chosen once
per prompt by :func:`~.raters.text_raters`, the scorer's ``prepare``) of the softmax attention
probability the row gives ``j`` at the scoring layer, reduced over the heads; the softmax runs over
the full row of keys present (text and candidates; under reroute the deferred tokens too, with
their carried states, exactly as :class:`~.attention.LastTokenAttention` builds them), causal
(a row sees the keys at or before its position). Only the ``R`` rater rows are projected, so memory
is ``O(R·H·S)``: never the sequence × sequence matrix the release materialises
(``methods.md`` §3.1 e).

SparseVLM+ (the release's ``USE_VERSION=2_0``, ``methods.md`` §3.1 a) adds two steps, both on the
rater rows only:

* **gravity correction** (``gravity=True``, "SparseVLM+ 4.2"): each head's probabilities are
  divided by ``B = RoPE(1)·RoPE(1)ᵀ/√h``, the logits all-ones queries and keys would have at the two
  tokens' original positions (a position-only matrix; deferred candidates at their own original
  positions). ``B`` is a sum of cosines of position differences and can be zero or negative; the
  release divides without a guard. Here ``|B| < 1e-3·√h`` is replaced by ``±1e-3·√h`` (its sign
  kept, zero counted positive): identical to the release wherever it is finite, never ``inf`` or
  ``NaN``. A negative ``B`` makes the token's corrected attention negative, as in the release.
* **priority heads** (``priority_heads=f``, "SparseVLM+ 4.3"): per image, the ``max(1, round(f·H))``
  heads with the largest sum of (corrected) attention over its raters × its visual candidates are
  kept and the reduction runs over those only (the release keeps 14 of LLaMA-7B's 32 heads:
  ``f = 14/32``).

GQA: query head ``h`` reads KV head ``h // (H / H_kv)`` (``repeat_kv``), as the model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..kinds import ScoreFrom
from .attention import HeadReduction
from .base import ScoringContext
from .raters import Raters, text_raters
from .selection import compact_index

#: |B| below this many √h is replaced by ±this (the gravity correction's guard)
GRAVITY_FLOOR = 1e-3


@dataclass(frozen=True)
class QueryRowAttention:
    """Scores = head-reduced attention from each image's rater rows, mean over those rows.

    ``heads``: ``"mean"`` (SparseVLM) or ``"max"`` over the heads kept; ``priority_heads``: the
    fraction of heads kept per image (``None``: all; SparseVLM+: ``14/32``); ``gravity``: divide by
    the RoPE position bias first (SparseVLM+). ``prepare`` picks the raters (``ctx.state``).
    """

    heads: HeadReduction = HeadReduction.MEAN
    priority_heads: float | None = None
    gravity: bool = False
    score_from: ScoreFrom = ScoreFrom.CURRENT

    def __post_init__(self) -> None:
        heads, score_from = HeadReduction.of(self.heads), ScoreFrom.of(self.score_from)
        if heads is None:
            raise ValueError(f"QueryRowAttention(heads={self.heads!r}): allowed are 'mean' and 'max'")
        if score_from is None:
            raise ValueError(
                f"QueryRowAttention(score_from={self.score_from!r}): allowed are 'current' and 'previous'"
            )
        fraction = self.priority_heads
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1
        ):
            raise ValueError(
                f"QueryRowAttention(priority_heads={fraction!r}): the fraction of heads kept is a number "
                "in (0, 1], or None for every head"
            )
        if not isinstance(self.gravity, bool):
            raise ValueError(f"QueryRowAttention(gravity={self.gravity!r}): allowed are True and False")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "score_from", score_from)

    def prepare(self, ctx: ScoringContext) -> Raters:
        """The raters of every image, once per prompt, from the embeddings entering layer 0."""
        return text_raters(ctx)

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        raters = ctx.state
        if not isinstance(raters, Raters):
            raise RuntimeError(
                f"QueryRowAttention.score needs the raters its prepare() chose (ctx.state={raters!r}); "
                "the routing executor calls prepare once per prefill, on the embeddings entering layer 0"
            )
        batch, n = ctx.visual.shape
        rows = torch.arange(batch, device=ctx.visual.device)[:, None]
        query_pos, query_valid = compact_index(raters.rows(batch), filler=n)  # (B, R)
        query_pos = query_pos.clamp(max=n - 1)
        if bool(ctx.keys.all()):
            key_pos, key_valid = torch.arange(n, device=ctx.visual.device).expand(batch, n), ctx.keys
        else:
            key_pos, key_valid = compact_index(ctx.keys, filler=n)
            key_pos = key_pos.clamp(max=n - 1)
        cos, sin = ctx.rope
        probs = self.probabilities(ctx, query_pos, query_valid, key_pos, key_valid)  # (B, R, H, K)
        if self.gravity:
            q_rope, k_rope = (
                (cos[rows, query_pos], sin[rows, query_pos]),
                (cos[rows, key_pos], sin[rows, key_pos]),
            )
            probs = probs / gravity_bias(ctx, q_rope, k_rope)[:, :, None, :]
        key_image = ctx.image_ids[rows, key_pos].masked_fill(~key_valid, -1)  # (B, K), -1: text
        member = raters.mask[key_image.clamp(min=0)[:, None, :], query_pos[:, :, None]]  # (B, R, K)
        member &= (key_image >= 0)[:, None, :] & query_valid[:, :, None]
        per_head = torch.einsum("brhk,brk->bhk", probs, member.float())  # rater sums, per head
        rated = self._reduce(per_head, key_image, key_valid & ctx.candidates[rows, key_pos])
        count = raters.mask.sum(dim=1).clamp(min=1)[key_image.clamp(min=0)]
        scores = ctx.hidden.new_zeros(batch, n + 1, dtype=torch.float32)
        scores[rows, torch.where(key_valid, key_pos, n)] = rated / count
        return scores[:, :n]

    def probabilities(
        self,
        ctx: ScoringContext,
        query_pos: torch.Tensor,
        query_valid: torch.Tensor,
        key_pos: torch.Tensor,
        key_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Causal softmax of the ``(B, R)`` rater rows over the ``(B, K)`` keys → float32 ``(B, R, H, K)``."""
        rows = torch.arange(query_pos.shape[0], device=query_pos.device)[:, None]
        cos, sin = ctx.rope
        q = ctx.adapter.project_queries(
            ctx.layer, ctx.hidden[rows, query_pos], cos[rows, query_pos], sin[rows, query_pos]
        )  # (B, R, H, hd), scaled
        k = ctx.adapter.project_keys(
            ctx.layer, ctx.hidden[rows, key_pos], cos[rows, key_pos], sin[rows, key_pos]
        )
        batch, n_rows, _, head_dim = q.shape
        q = q.view(batch, n_rows, k.shape[2], -1, head_dim)  # head h reads KV head h // groups
        logits = torch.einsum("brhgd,bkhd->brhgk", q, k).float().flatten(2, 3)  # (B, R, H, K)
        allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
        allowed |= ~query_valid[:, :, None]  # filler rows: finite, weighted 0 later
        return logits.masked_fill(~allowed[:, :, None, :], float("-inf")).softmax(dim=-1)

    def _reduce(
        self, per_head: torch.Tensor, key_image: torch.Tensor, visual_keys: torch.Tensor
    ) -> torch.Tensor:
        """``(B, H, K)`` rater sums → ``(B, K)``, over all heads or each image's priority heads."""
        heads = per_head.shape[1]
        if self.priority_heads is None:
            keep = torch.ones_like(per_head, dtype=torch.bool)
        else:
            images = int(key_image.max()) + 1
            mass = per_head.new_zeros(heads, max(images, 1))  # (H, images): raters × visual mass
            hit = visual_keys & (key_image >= 0)
            mass.index_add_(1, key_image[hit], per_head.permute(1, 0, 2)[:, hit])
            top = min(heads, max(1, math.floor(self.priority_heads * heads + 0.5)))
            chosen = torch.zeros_like(mass, dtype=torch.bool)
            chosen.scatter_(0, mass.topk(top, dim=0).indices, True)
            keep = chosen[:, key_image.clamp(min=0)].permute(1, 0, 2)  # (B, H, K)
        if self.heads is HeadReduction.MEAN:
            return (per_head * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        return per_head.masked_fill(~keep, float("-inf")).amax(dim=1)


def gravity_bias(
    ctx: ScoringContext,
    query_rope: tuple[torch.Tensor, torch.Tensor],
    key_rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``B = RoPE(1)·RoPE(1)ᵀ/√h`` ``(B, R, K)`` at the rows' and keys' original positions, guarded.

    All-ones queries and keys rotated by the family's own rule (partial RoPE leaves the other
    dimensions at 1); ``|B| < GRAVITY_FLOOR·√h`` becomes ``±GRAVITY_FLOOR·√h``, sign kept.
    """
    attn: Any = ctx.layer.self_attn  # the attention submodule (nn.Module.__getattr__ says Tensor | Module)
    head_dim: int = attn.head_dim
    q, k = (
        ctx.adapter.apply_rope(
            cos.new_ones(*cos.shape[:2], 1, head_dim, dtype=torch.float32), cos.float(), sin.float()
        )[:, :, 0]
        for cos, sin in (query_rope, key_rope)
    )  # (B, R, hd) and (B, K, hd), in float32
    bias = torch.einsum("brd,bkd->brk", q, k) / head_dim**0.5
    floor = GRAVITY_FLOOR * head_dim**0.5
    return torch.where(bias.abs() < floor, torch.where(bias < 0, -floor, floor), bias)
