"""Attention received from the last prompt tokens, computed by the router from a few query rows.

The default rule (FastV, arXiv 2403.06764; PyramidDrop, arXiv 2410.17247; Reroute, arXiv
2606.12412): the softmax attention a visual token receives from the sample's last non-padding
token at the scoring layer, with that layer's own input norm, Q/K projections (and q/k norms where
the family has them) and rotary embedding, averaged over heads. Nüwa's stage 2 on Qwen2.5-VL
(arXiv 2602.02951, ``nuwa.md`` §3.3) averages the last three query rows and takes the max over
heads: ``LastTokenAttention(rows=3, heads="max")``. Only ``rows`` query rows are built, so memory
stays linear in the sequence length and the model's attention implementation does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kinds import Choice, ScoreFrom
from .base import ScoringContext
from .selection import compact_index


class HeadReduction(Choice):
    """How the attention of a key is reduced over the heads (``heads=``; given as its string too)."""

    MEAN = "mean"
    MAX = "max"


HEAD_REDUCTIONS = tuple(HeadReduction)


@dataclass(frozen=True)
class LastTokenAttention:
    """Scores = attention from the last ``rows`` query positions (mean over rows), reduced over heads.

    ``causal=False`` lets every query row see every key (the Nüwa release's scoring layer ran
    without a causal mask, ``nuwa.md`` §3.3); it changes nothing when ``rows=1``.
    """

    rows: int = 1
    heads: HeadReduction = HeadReduction.MEAN
    score_from: ScoreFrom = ScoreFrom.CURRENT
    causal: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(
                f"LastTokenAttention(rows={self.rows!r}): the number of query rows is an int ≥ 1"
            )
        heads, score_from = HeadReduction.of(self.heads), ScoreFrom.of(self.score_from)
        if heads is None:
            raise ValueError(f"LastTokenAttention(heads={self.heads!r}): allowed are 'mean' and 'max'")
        if score_from is None:
            raise ValueError(
                f"LastTokenAttention(score_from={self.score_from!r}): allowed are 'current' and 'previous'"
            )
        object.__setattr__(self, "heads", heads)  # the strings of the public edge, as enums inside
        object.__setattr__(self, "score_from", score_from)

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        n = ctx.visual.shape[1]
        rows = torch.arange(ctx.hidden.shape[0], device=ctx.hidden.device)[:, None]
        back = torch.arange(self.rows - 1, -1, -1, device=ctx.hidden.device)
        query_pos = (ctx.last[:, None] - back).clamp(min=0)  # (B, R)
        cos, sin = ctx.rope
        if bool(ctx.keys.all()):  # every token is a key (reroute, no padding): no gather needed
            index, key_valid = None, ctx.keys
            keys, key_rope = ctx.hidden[:, :n], (cos, sin)
        else:
            index, key_valid = compact_index(ctx.keys, filler=n)
            rope_index = index.clamp(max=n - 1)
            keys, key_rope = ctx.hidden[rows, index], (cos[rows, rope_index], sin[rows, rope_index])
        attention = self.attention(
            ctx,
            keys=keys,
            key_valid=key_valid,
            key_rope=key_rope,
            key_pos=index.clamp(max=n - 1) if index is not None else None,
            query=ctx.hidden[rows, query_pos],
            query_rope=(cos[rows, query_pos], sin[rows, query_pos]),
            query_pos=query_pos,
        )
        if index is None:
            return attention
        scores = attention.new_zeros(attention.shape[0], n + 1)
        scores[rows, index] = attention
        return scores[:, :n]

    def attention(
        self,
        ctx: ScoringContext,
        keys: torch.Tensor,
        key_valid: torch.Tensor,
        key_rope: tuple[torch.Tensor, torch.Tensor],
        key_pos: torch.Tensor | None,
        query: torch.Tensor,
        query_rope: tuple[torch.Tensor, torch.Tensor],
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of the ``(B, R, D)`` query rows over ``(B, K, D)`` keys → float32 ``(B, K)``."""
        batch, n_rows = query.shape[:2]
        q = ctx.adapter.project_queries(ctx.layer, query, *query_rope)  # (B, R, H, hd), scaled
        k = ctx.adapter.project_keys(ctx.layer, keys, *key_rope)  # (B, K, KVH, hd)
        kv_heads, head_dim = k.shape[2], k.shape[3]
        # query head h reads KV head h // groups (the repeat_kv layout)
        q = q.view(batch, n_rows, kv_heads, -1, head_dim)
        logits = torch.einsum("brhgd,bkhd->brhgk", q, k).float()
        allowed = key_valid[:, None, :]
        if self.causal and n_rows > 1:
            positions = key_pos if key_pos is not None else torch.arange(keys.shape[1], device=keys.device)
            allowed = allowed & (positions.expand(batch, -1)[:, None, :] <= query_pos[:, :, None])
        logits = logits.masked_fill(~allowed[:, :, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1).mean(dim=1)  # (B, KVH, G, K): mean over query rows
        if self.heads is HeadReduction.MEAN:
            return probs.mean(dim=(1, 2))
        return probs.amax(dim=(1, 2))
