"""A slow, independent reference of routed execution, for one sample.

It drives the decoder layers by hand on explicitly shortened sequences (no hooks, no compact
buffers, no batch fillers): at each decision it physically builds the list of tokens of the
stage, computes RoPE from their original position ids, and builds the causal mask itself.
Scores come from the layer's own attention module run in eager mode on the present tokens (a
full attention matrix: the thing the router must never build), so family details (q/k norms,
Qwen3.5's gated queries and partial RoPE) are the model's own.

Family rules the reference states on its own: Qwen3-VL's DeepStack rows are added after layer
``i < len(levels)`` to the visual tokens present in that layer, each token its own row;
Qwen3.5's linear-attention layers run on the present tokens in order (no mask: one sample, no
padding).
"""

from __future__ import annotations

import torch

from vlm_reroute.adapters import adapter_for


def _decoder(model):
    return adapter_for(model).decoder


def embeddings_and_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged input embeddings ``(1, N, D)`` and the model's own position ids."""
    embeds, pos, _ = decoder_inputs(model, inputs)
    return embeds, pos


def decoder_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Merged input embeddings, position ids and the other keyword inputs of the decoder."""
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise StopIteration

    handle = _decoder(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except StopIteration:
        pass
    finally:
        handle.remove()
    embeds = captured.pop("inputs_embeds")
    pos = captured.pop("position_ids", None)
    n = embeds.shape[1]
    if pos is None:
        pos = torch.arange(n)[None]
    if pos.ndim == 3 and pos.shape[0] == 4:  # Qwen packs text positions first
        pos = pos[1:]
    return embeds, pos, captured


def _causal_mask(keep_positions: torch.Tensor, dtype) -> torch.Tensor:
    n = keep_positions.numel()
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n, dtype=dtype)
    mask[~allowed] = torch.finfo(dtype).min
    return mask[None, None]


def _rope(model, hidden, position_ids):
    return _decoder(model).rotary_emb(hidden, position_ids)


def eager_attention(model, layer_idx, hidden, position_ids, present: torch.Tensor):
    """The layer's own attention module in eager mode over the present tokens (causal):
    ``(idx, weights (1, H, n, n), (cos, sin))``, ``idx`` the present positions in order."""
    layer = _decoder(model).layers[layer_idx]
    attn = layer.self_attn
    idx = present.nonzero().flatten()
    h = layer.input_layernorm(hidden[:, idx])
    cos, sin = _rope(model, h, position_ids[..., idx])
    config = attn.config
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        _, weights = attn(
            hidden_states=h, position_embeddings=(cos, sin), attention_mask=_causal_mask(idx, h.dtype)
        )
    finally:
        config._attn_implementation = saved
    return idx, weights, (cos, sin)


def full_matrix_scores(model, layer_idx, hidden, position_ids, present: torch.Tensor) -> torch.Tensor:
    """Last-row softmax attention over the present tokens, mean over heads, from the layer's own
    attention module in eager mode (its full attention matrix)."""
    idx, weights, _ = eager_attention(model, layer_idx, hidden, position_ids, present)
    row = weights.float().mean(1)[0, -1]
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
    cache=None,
    scores_of=None,
    select_of=None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``(N, V)`` and the scores of each decision, given the decisions
    (``selected``: indices into the visual tokens, one tensor per decision).

    ``extra_ids``: tokens appended after the prompt (generated ones); they are text, so they go
    through every layer and see each layer's stage tokens: this is what decoding must compute.
    ``cache``: an empty cache the layers fill with the tokens they run on. ``scores_of``: another
    rule with :func:`full_matrix_scores`' signature (SparseVLM's rater rows: ``sparsevlm_reference.py``).
    ``select_of``: a set rule ``(model, layer_idx, hidden, position_ids, candidates, count) -> visual
    indices`` (DART: ``dart_reference.py``) that chooses each decision here, at the decision layer, with
    ``len(selected[i])`` tokens; the second value returned is then its choices, not scores.
    """
    decoder = _decoder(model)
    embeds, pos, extra = decoder_inputs(model, inputs)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    if extra_ids is not None:  # generated tokens are text, even one that happens to be the image id
        embeds = torch.cat([embeds, decoder.embed_tokens(extra_ids[None])], dim=1)
        steps = torch.arange(1, extra_ids.numel() + 1)
        pos = torch.cat([pos, pos[..., -1:] + steps], dim=-1)
        visual = torch.cat([visual, torch.zeros_like(extra_ids, dtype=torch.bool)])
    vis_pos = visual.nonzero().flatten()
    deepstack = extra.get("deepstack_visual_embeds") or []
    layer_types = getattr(decoder.config, "layer_types", None) or ["full_attention"] * len(decoder.layers)
    hidden = embeds.clone()
    present = torch.ones(hidden.shape[1], dtype=torch.bool)
    scores = []

    def score(layer_idx: int) -> torch.Tensor:
        key_set = present | visual if reroute else present
        return (scores_of or full_matrix_scores)(model, layer_idx, hidden, pos, key_set)[vis_pos]

    for j, layer in enumerate(decoder.layers):
        if j in stage_layers:
            chosen = selected[stage_layers.index(j)]
            if select_of is not None:  # the reference's own set, from the states it carries
                candidates = visual.clone() if reroute else present & visual
                chosen = select_of(model, j, hidden, pos, candidates, len(chosen))
                scores.append(chosen)
            elif score_from == "current":
                scores.append(score(j))
            present = ~visual.clone()
            present[vis_pos[chosen]] = True
        if score_from == "previous" and j + 1 in stage_layers:
            scores.append(score(j))
        idx = present.nonzero().flatten()
        h = hidden[:, idx]
        cos, sin = _rope(model, h, pos[..., idx])
        linear = layer_types[j] == "linear_attention"
        mask = None if linear else _causal_mask(idx, h.dtype)
        out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache)
        if j < len(deepstack):  # DeepStack: each present visual token gets its own row
            rank = visual.long().cumsum(0) - 1
            here = visual[idx]
            out = out.clone()
            out[0, here] = out[0, here] + deepstack[j][rank[idx[here]]].to(out)
        hidden[:, idx] = out
    logits = model.lm_head(decoder.norm(hidden))[0]
    return logits, scores
