"""An independent reference of Nüwa on one sample: stage 1 from the standalone signal functions,
stage 2 by driving the decoder layers by hand on physically shortened sequences.

Stage 1: ``llava_signals`` / ``qwen_signals`` (checked against the towers' eager attention in
``test_nuwa_signals.py``) and ``run_stage1``; the rewritten features go through LLaVA's projector.
Stage 2: at each decision the stage's tokens are listed explicitly, RoPE is computed from their
original position ids and the causal mask is built here; scores come from the full attention
matrix of the layer before the decision (the release's convention), over the tokens present.
"""

from __future__ import annotations

import torch
from reference import _causal_mask, _decoder, _rope, embeddings_and_positions
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from vlm_reroute.methods.nuwa_aggregate import llava_tau, qwen_tau, run_stage1
from vlm_reroute.methods.nuwa_signals import llava_signals, qwen_signals


def stage1(model, inputs: dict, k1: list[int], n_per_cell: int, official: bool = False, gate=None):
    """Per image: (anchors, features the language model receives (N, D)), from the standalone path."""
    if "image_grid_thw" in inputs:
        sig = qwen_signals(model, inputs["pixel_values"], inputs["image_grid_thw"], official=official)
        taus = [qwen_tau(*s.shape) for s in sig.salience]
        weighting = "release_qwen" if official else "convex"
        gate = 0.1 if gate is None else gate
        out = run_stage1(sig.features, sig.similarity, sig.salience, n_per_cell, k1, taus, gate, weighting)
        rewritten = []
        for r, feats in zip(out, sig.features, strict=True):
            f = feats.clone()
            f[r.anchors] = r.features
            rewritten.append(f)
        return [r.anchors for r in out], rewritten, out
    sig = llava_signals(model, inputs["pixel_values"])
    weighting = "release_llava" if official else "convex"
    gate = 0.55 if gate is None else gate
    out = run_stage1(sig.features, sig.similarity, sig.salience, n_per_cell, k1, llava_tau(), gate, weighting)
    rewritten = []
    for r, feats in zip(out, sig.features, strict=True):
        f = feats.clone()
        f[r.anchors] = r.features
        rewritten.append(model.model.multi_modal_projector(f[None])[0])
    return [r.anchors for r in out], rewritten, out


def attention_rows(model, layer_idx, hidden, position_ids, present, rows=1, heads="mean", causal=True):
    """Scores over every position from the full matrix: mean of the last ``rows`` query rows, then
    ``heads`` (mean or max); keys (and queries) are the ``present`` tokens."""
    layer = _decoder(model).layers[layer_idx]
    attn = layer.self_attn
    idx = present.nonzero().flatten()
    h = layer.input_layernorm(hidden[:, idx])
    cos, sin = _rope(model, h, position_ids[..., idx])
    hd = attn.head_dim
    q = attn.q_proj(h).view(1, idx.numel(), -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(1, idx.numel(), -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    weights = (q @ k.transpose(2, 3)).float() * attn.scaling
    if causal:
        weights = weights + _causal_mask(idx, torch.float32)
    probs = weights.softmax(-1)[0, :, -rows:].mean(dim=1)  # (heads, keys)
    row = probs.mean(0) if heads == "mean" else probs.amax(0)
    out = torch.zeros(hidden.shape[1])
    out[idx] = row
    return out


def nuwa_reference(
    model,
    inputs: dict,
    features: list[torch.Tensor],
    anchors: list[torch.Tensor],
    layers: list[int],
    selected: list[torch.Tensor],
    reroute: bool,
    extra_ids: torch.Tensor | None = None,
    rows: int = 1,
    heads: str = "mean",
    causal: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``(N, V)`` and the stage-2 scores (over the sample's visual tokens) of each decision.

    ``features``/``anchors``: per image, as :func:`stage1` returns them; ``selected``: the visual
    tokens (sample numbering) of each stage-2 decision at ``layers``.
    """
    decoder = _decoder(model)
    embeds, pos = embeddings_and_positions(model, inputs)
    ids = inputs["input_ids"][0]
    visual = ids == model.config.image_token_id
    vis_pos = visual.nonzero().flatten()
    embeds = embeds.clone()
    embeds[0, vis_pos] = torch.cat(features).to(embeds.dtype)
    if extra_ids is not None:
        embeds = torch.cat([embeds, decoder.embed_tokens(extra_ids[None])], dim=1)
        steps = torch.arange(1, extra_ids.numel() + 1)
        pos = torch.cat([pos, pos[..., -1:] + steps], dim=-1)
        visual = torch.cat([visual, torch.zeros(extra_ids.numel(), dtype=torch.bool)])
    offsets = torch.tensor([0] + [f.shape[0] for f in features]).cumsum(0)
    entered = torch.zeros_like(visual)
    entered[vis_pos[torch.cat([a + o for a, o in zip(anchors, offsets, strict=False)])]] = True
    hidden = embeds
    present = ~visual | entered
    scores = []
    prompt = torch.arange(visual.numel()) < ids.numel()  # decisions are the prompt's own
    for j, layer in enumerate(decoder.layers):
        if j + 1 in layers:  # the layer before a decision scores it
            keys = ((~visual | entered) if reroute else present) & prompt
            full = attention_rows(model, j, hidden, pos, keys, rows, heads, causal)
            scores.append(full[vis_pos])
        if j in layers:
            present = ~visual.clone()
            present[vis_pos[selected[layers.index(j)]]] = True
        idx = present.nonzero().flatten()
        h = hidden[:, idx]
        cos, sin = _rope(model, h, pos[..., idx])
        hidden = hidden.clone()
        hidden[:, idx] = layer(h, attention_mask=_causal_mask(idx, h.dtype), position_embeddings=(cos, sin))
    logits = model.lm_head(decoder.norm(hidden))[0]
    return logits, scores
