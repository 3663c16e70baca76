"""SparseVLM's rule written from ``methods.md`` §3.1 (a), independently of ``src/``: one sample, one image.

Raters: on the embeddings entering layer 0, ``M = V·Txᵀ`` (V the visual rows, Tx every token after
the image), softmax over the text axis, mean over the visual axis gives ``r``; raters are
``r_t > mean(r)`` (computed in float64 here). Scores: the layer's own attention module in eager
mode over the tokens present (the full S × S matrix), per head; SparseVLM+ divides each head's
probabilities by ``B = RoPE(1)·RoPE(1)ᵀ/√h`` (with the library's documented guard: ``|B| < 1e-3·√h``
becomes ``±1e-3·√h``) and keeps the ``round(f·H)`` heads with the largest sum over raters ×
visual tokens present; then mean over those heads, mean over the rater rows.
"""

from __future__ import annotations

import math

import torch
from reference import _decoder, eager_attention, embeddings_and_positions


def reference_raters(
    embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool ``(N,)``: the raters of the image whose tokens ``visual`` marks (``embeds`` ``(1, N, D)``),
    among the tokens after it (and in ``text``, when given: the library's rule for several images)."""
    end = int(visual.nonzero().max())
    after = torch.arange(visual.numel()) > end
    if text is not None:
        after &= text
    v = embeds[0, visual].double()
    t = embeds[0, after].double()
    r = (v @ t.T).softmax(dim=1).mean(dim=0)
    raters = torch.zeros_like(visual)
    raters[after] = r > r.mean()
    return raters


def rater_attention(model, layer_idx, hidden, position_ids, present, visual, raters, gravity, priority):
    """Scores ``(N,)`` of every present token from the rater rows (zeros elsewhere)."""
    idx, weights, (cos, sin) = eager_attention(model, layer_idx, hidden, position_ids, present)
    head_dim = _decoder(model).layers[layer_idx].self_attn.head_dim
    probs = weights[0].double()  # (H, n, n): the full matrix
    rows = raters[idx].nonzero().flatten()
    if gravity:
        probs = probs / _bias(cos[0].double(), sin[0].double(), head_dim)
    visual = visual[idx].nonzero().flatten()  # visual tokens present, in present order
    if priority is not None:
        heads = probs.shape[0]
        mass = probs[:, rows][:, :, visual].sum(dim=(1, 2))
        top = max(1, math.floor(priority * heads + 0.5))
        probs = probs[mass.topk(top).indices]
    row = probs.mean(dim=0)[rows].mean(dim=0)
    out = torch.zeros(hidden.shape[1], dtype=torch.float64)
    out[idx] = row
    return out.float()


def _bias(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``RoPE(1)·RoPE(1)ᵀ/√h`` for all-ones vectors, rotated on the first ``cos.shape[-1]`` dims."""
    ones = torch.ones(cos.shape[0], head_dim, dtype=torch.float64)
    rot = cos.shape[-1]
    half = rot // 2
    x = ones[:, :rot]
    rotated = torch.cat((-x[:, half:], x[:, :half]), dim=-1)
    ones[:, :rot] = x * cos + rotated * sin
    bias = ones @ ones.T / math.sqrt(head_dim)
    floor = 1e-3 * math.sqrt(head_dim)
    return torch.where(bias.abs() < floor, torch.where(bias < 0, -floor, floor), bias)


def sparsevlm_scores_of(model, inputs: dict, gravity: bool = False, priority: float | None = None):
    """``routed_reference``'s ``scores_of`` hook for SparseVLM on this one-image prompt, and its raters."""
    embeds, _ = embeddings_and_positions(model, inputs)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    raters = reference_raters(embeds, visual)

    def scores_of(model, layer_idx, hidden, position_ids, present):
        return rater_attention(
            model, layer_idx, hidden, position_ids, present, visual, raters, gravity, priority
        )

    return scores_of, raters
