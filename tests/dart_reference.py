"""DART's selection (arXiv 2502.11494) written from methods.md §3.2, one token at a time, in float64.

Keys are the layer's own: its attention module runs on the input norm of every token's carried state
with a zero rotary angle, and a registered attention function records the key states it receives
(after ``k_proj`` and any k-norm; the library takes key norms before RoPE, so that left padding
cannot change them), so no family detail is restated here. Features are the
decoder's final norm of the carried states. The loop is the published one with the library's exact
quotas: image pivots = top ``image_pivots`` candidates by key L1 norm; text pivots = top
``text_pivots`` non-visual tokens after the image; pivots taken in descending key norm; the
``k - image pivots`` picks spread evenly (the first ``r mod P`` pivots one more); each pivot takes
its quota of the lowest-cosine tokens left in the pool; text pivots are then dropped.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from vlm_reroute.adapters import adapter_for

_CAPTURE = "dart_reference_capture"
_captured: dict[str, torch.Tensor] = {}


class _Captured(Exception):
    pass


def _capture(module, query, key, value, attention_mask, **kwargs):
    _captured["key"] = key  # (1, kv_heads, N, head_dim), as the attention function receives it
    raise _Captured


AttentionInterface.register(_CAPTURE, _capture)


def layer_keys(model, layer_idx: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``(N, kv_heads · head_dim)`` keys of every token entering layer ``layer_idx``."""
    decoder = adapter_for(model).decoder
    layer = decoder.layers[layer_idx]
    h = layer.input_layernorm(hidden)
    cos, sin = decoder.rotary_emb(h, position_ids)
    cos, sin = torch.ones_like(cos), torch.zeros_like(sin)  # keys before RoPE (docs/methods.md: DART)
    config = layer.self_attn.config
    saved = config._attn_implementation
    config._attn_implementation = _CAPTURE
    try:
        layer.self_attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)
    except _Captured:
        pass
    finally:
        config._attn_implementation = saved
    key = _captured.pop("key")[0]  # (kv_heads, N, head_dim)
    return key.transpose(0, 1).reshape(key.shape[1], -1)


def dart_choice(
    norms: list[float],
    features: torch.Tensor,
    candidates: list[int],
    text_after: list[int],
    count: int,
    image_pivots: int = 4,
    text_pivots: int = 4,
) -> list[int]:
    """The kept positions of one image: plain Python over tokens (positions index ``norms`` and
    ``features``)."""
    by_norm = sorted(candidates, key=lambda t: (-norms[t], t))
    img = by_norm[: min(image_pivots, count)]
    txt = sorted(text_after, key=lambda t: (-norms[t], t))[:text_pivots]
    pivots = sorted(img + txt, key=lambda t: -norms[t])  # image pivots first among equal norms
    remaining = count - len(img)
    pool = [t for t in candidates if t not in img]
    kept = list(img)
    for i, p in enumerate(pivots):
        quota = remaining // len(pivots) + (1 if i < remaining % len(pivots) else 0)
        cos = {t: float(features[p] @ features[t]) for t in pool}
        picks = sorted(pool, key=lambda t: (cos[t], t))[:quota]
        kept += picks
        pool = [t for t in pool if t not in picks]
    return sorted(kept)


def dart_select_of(inputs: dict, image_pivots: int = 4, text_pivots: int = 4, features: str = "final_norm"):
    """A ``select_of`` rule for :func:`reference.routed_reference` on ``inputs`` (one sample, one image)."""

    def select(model, layer_idx, hidden, position_ids, candidates, count) -> torch.Tensor:
        decoder = adapter_for(model).decoder
        is_visual = inputs["input_ids"][0] == model.config.image_token_id
        norms = layer_keys(model, layer_idx, hidden, position_ids).double().abs().sum(dim=1).tolist()
        states = hidden[0]
        if features == "final_norm":
            states = decoder.norm(hidden)[0]
        elif features == "layer_norm":
            states = decoder.layers[layer_idx].input_layernorm(hidden)[0]
        feats = torch.nn.functional.normalize(states.double(), dim=-1)
        vis_pos = is_visual.nonzero().flatten().tolist()
        text_after = [t for t in range(vis_pos[-1] + 1, is_visual.numel()) if not is_visual[t]]
        cands = candidates.nonzero().flatten().tolist()
        kept = dart_choice(norms, feats, cands, text_after, count, image_pivots, text_pivots)
        rank = {t: i for i, t in enumerate(vis_pos)}
        return torch.tensor([rank[t] for t in kept], dtype=torch.long)

    return select
