"""Last-token attention scores, computed by the router from one query row.

The score of a token is the softmax attention it receives from the sample's last non-padding
token at the scoring layer, with that layer's own input norm, Q/K projections and rotary
embedding, averaged over heads. Only the query row is built, so memory stays linear in the
sequence length and the model's attention implementation (eager, sdpa, flash) does not matter.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.base import ModelAdapter


def last_token_attention(
    adapter: ModelAdapter,
    layer: nn.Module,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    key_rope: tuple[torch.Tensor, torch.Tensor],
    query: torch.Tensor,
    query_rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Head-averaged attention of ``query`` over ``keys``: float32 ``(B, K)``, 0 on invalid keys.

    ``keys``: hidden states ``(B, K, D)`` entering ``layer``; ``key_valid``: bool ``(B, K)``;
    ``query``: ``(B, D)`` hidden state of each sample's last token; ``*_rope``: the matching
    ``(cos, sin)`` of shape ``(B, K, head_dim)`` and ``(B, 1, head_dim)``.
    """
    attn = layer.self_attn
    batch, n_keys, _ = keys.shape
    head_dim = attn.head_dim
    groups = attn.num_key_value_groups
    normed_keys = layer.input_layernorm(keys)
    normed_query = layer.input_layernorm(query[:, None])
    # (B, T, heads, head_dim) straight from the projections: no transposed copies
    k = adapter.apply_rope(attn.k_proj(normed_keys).view(batch, n_keys, -1, head_dim), *key_rope)
    q = adapter.apply_rope(attn.q_proj(normed_query).view(batch, 1, -1, head_dim), *query_rope)
    kv_heads = k.shape[2]
    # Head h reads KV head h // groups (the repeat_kv layout), so group the query heads.
    q = q.view(batch, kv_heads, groups, head_dim) * attn.scaling
    logits = torch.einsum("bhgd,bnhd->bhgn", q, k).float()
    logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))
