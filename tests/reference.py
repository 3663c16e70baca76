"""A slow, independent reference of routed execution, for one sample.

It drives the decoder layers by hand on explicitly shortened sequences (no hooks, no compact
buffers, no batch fillers): at each decision it physically builds the list of tokens of the
stage, computes RoPE from their original position ids, and builds the causal mask itself.
Scores come from a full attention matrix (the thing the router must never build).
"""

from __future__ import annotations

import torch


def _decoder(model):
    return model.model.language_model


def embeddings_and_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged input embeddings ``(1, N, D)`` and the model's own position ids."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]
        captured["position_ids"] = kwargs.get("position_ids")
        raise StopIteration

    handle = _decoder(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except StopIteration:
        pass
    finally:
        handle.remove()
    embeds = captured["embeds"]
    pos = captured["position_ids"]
    n = embeds.shape[1]
    if pos is None:
        pos = torch.arange(n)[None]
    if pos.ndim == 3 and pos.shape[0] == 4:  # Qwen packs text positions first
        pos = pos[1:]
    return embeds, pos


def _causal_mask(keep_positions: torch.Tensor, dtype) -> torch.Tensor:
    n = keep_positions.numel()
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n, dtype=dtype)
    mask[~allowed] = torch.finfo(dtype).min
    return mask[None, None]


def _rope(model, hidden, position_ids):
    return _decoder(model).rotary_emb(hidden, position_ids)


def full_matrix_scores(model, layer_idx, hidden, position_ids, present: torch.Tensor) -> torch.Tensor:
    """Last-row softmax attention over the present tokens, from the full matrix (eager style)."""
    layer = _decoder(model).layers[layer_idx]
    attn = layer.self_attn
    idx = present.nonzero().flatten()
    h = layer.input_layernorm(hidden[:, idx])
    pos = position_ids[..., idx]
    cos, sin = _rope(model, h, pos)
    hd = attn.head_dim
    q = attn.q_proj(h).view(1, idx.numel(), -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(1, idx.numel(), -1, hd).transpose(1, 2)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    weights = (q @ k.transpose(2, 3)).float() * attn.scaling + _causal_mask(idx, torch.float32)
    row = weights.softmax(-1).mean(1)[0, -1]
    out = torch.zeros(hidden.shape[1])
    out[idx] = row
    return out


def routed_reference(
    model,
    inputs: dict,
    stage_layers: list[int],
    selected: list[torch.Tensor],
    reroute: bool,
    extra_ids: torch.Tensor | None = None,
    score_from: str = "current",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``(N, V)`` and the scores of each decision, given the decisions
    (``selected``: indices into the visual tokens, one tensor per decision).

    ``extra_ids``: tokens appended after the prompt (generated ones); they are text, so they go
    through every layer and see each layer's stage tokens: this is what decoding must compute.
    """
    decoder = _decoder(model)
    embeds, pos = embeddings_and_positions(model, inputs)
    ids = inputs["input_ids"][0]
    if extra_ids is not None:
        embeds = torch.cat([embeds, decoder.embed_tokens(extra_ids[None])], dim=1)
        steps = torch.arange(1, extra_ids.numel() + 1)
        pos = torch.cat([pos, pos[..., -1:] + steps], dim=-1)
        ids = torch.cat([ids, extra_ids])
    visual = ids == model.config.image_token_id
    vis_pos = visual.nonzero().flatten()
    hidden = embeds.clone()
    present = torch.ones(hidden.shape[1], dtype=torch.bool)
    scores = []

    def score(layer_idx: int) -> torch.Tensor:
        key_set = present | visual if reroute else present
        return full_matrix_scores(model, layer_idx, hidden, pos, key_set)[vis_pos]

    for j, layer in enumerate(decoder.layers):
        if j in stage_layers:
            if score_from == "current":
                scores.append(score(j))
            present = ~visual.clone()
            present[vis_pos[selected[stage_layers.index(j)]]] = True
        if score_from == "previous" and j + 1 in stage_layers:
            scores.append(score(j))
        idx = present.nonzero().flatten()
        h = hidden[:, idx]
        cos, sin = _rope(model, h, pos[..., idx])
        hidden[:, idx] = layer(h, attention_mask=_causal_mask(idx, h.dtype), position_embeddings=(cos, sin))
    logits = model.lm_head(decoder.norm(hidden))[0]
    return logits, scores
