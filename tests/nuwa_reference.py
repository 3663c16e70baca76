"""An independent reference of Nüwa on one sample, written from the spec (``../shared/design/nuwa.md``,
cited as §) and the documented generalisations in ``docs/nuwa-stage1.md``; nothing here comes from
``vlm_reroute`` (this module imports none of it).

Stage 1 (§1, §3.1): the vision tower is *copied* and run in eager attention, so its signals are the
tower's own attention probabilities (CLIP: ``output_attentions``; Qwen2.5-VL: the weights its eager
attention function returns, per segment) and its own hidden states; separation, alignment, the gate
and the aggregation are written out per image, with loops, the full ``N × N`` weight matrix and the
spec's zero padding. Stage 2: at each decision the stage's tokens are listed explicitly, RoPE is
computed from their original position ids and the causal mask is built here; scores come from the
full attention matrix of the layer before the decision (the release's convention).

Depth scaling for the 2-block test towers (``docs/nuwa-stage1.md``): the release's similarity layers
``hs[16..24]`` of 24 (CLIP) and blocks ``7..23`` of 32 (Qwen) become the same fractions of the depth,
rounded half up.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen_modeling
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from transformers.vision_utils import get_vision_window_index

LLAVA_DIST_SQ, LLAVA_GATE = 280.0, 0.55  # §1.4, §5
QWEN_TAU_SCALE, QWEN_GATE = 0.8, 0.1  # §3.1
EPS = 1e-8  # the release's normaliser guard (§1.4 step 4)


@dataclass(frozen=True)
class ImageResult:
    """Stage 1 of one image: ``anchors`` (raster indices, ascending), their ``features`` ``(K, D)``
    (before LLaVA's projector; Qwen: merged embeddings), which ``aggregated`` and the gate ``threshold``."""

    anchors: torch.Tensor
    features: torch.Tensor
    aggregated: torch.Tensor
    threshold: float


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ---- stage 1: the rules of §1.2-§1.4 and §3.1, one image at a time -------------------------------


def separation_and_alignment(salience: torch.Tensor, n_per_cell: int, k1: int) -> torch.Tensor:
    """§1.2-§1.3 (§3.1 for odd grids): ``salience`` ``(H, W)``; returns the anchors' raster indices.

    The grid is padded to even sides with zero salience; each 2×2 cell proposes its ``n_per_cell``
    highest tokens; the ``k1`` highest candidates are kept, and those on padding dropped. Ties go to
    the earlier raster position (a fixed rule; the release does not define one).
    """
    height, width = salience.shape
    ph, pw = height + height % 2, width + width % 2
    padded = torch.zeros(ph, pw, dtype=torch.float64)
    padded[:height, :width] = salience.double()
    candidates = []  # (row, col) on the padded grid
    for r0 in range(0, ph, 2):
        for c0 in range(0, pw, 2):
            cell = [(r, c) for r in (r0, r0 + 1) for c in (c0, c0 + 1)]  # raster order inside the cell
            ranked = sorted(cell, key=lambda rc: (-float(padded[rc]), rc[0] * pw + rc[1]))
            candidates += ranked[:n_per_cell]
    ranked = sorted(candidates, key=lambda rc: (-float(padded[rc]), rc[0] * pw + rc[1]))[:k1]
    anchors = sorted(r * width + c for r, c in ranked if r < height and c < width)
    return torch.tensor(anchors, dtype=torch.long)


def aggregate_image(
    features: torch.Tensor,
    similarity: torch.Tensor,
    salience: torch.Tensor,
    anchors: torch.Tensor,
    tau: float,
    gate_quantile: float,
    weighting: str,
) -> ImageResult:
    """§1.4 (and §3.1 "Aggregation"). ``features`` ``(N, D)``, ``similarity`` ``(N, Ds)``, ``salience``
    ``(H, W)``, all raster order. ``weighting``: ``"convex"`` (self weight 1, row / Σ — the project's
    default), ``"release_llava"`` (row / (Σ + 1e-8), then the self weight set to 1) or
    ``"release_qwen"`` (computed self weight, row / (Σ + 1e-8))."""
    height, width = salience.shape
    n = height * width
    s = salience.flatten().float()
    unit = similarity.float() / similarity.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.T  # (N, N)
    coords = torch.stack([torch.arange(n) // width, torch.arange(n) % width], dim=1).float()
    kernel = (1 - torch.cdist(coords, coords) / tau).clamp(min=0)
    weights = cosine.clamp(min=0) * kernel  # w_ij = relu(c_ij) · κ_ij
    theta = float(torch.quantile(s[anchors], gate_quantile))  # linear interpolation
    rows, aggregated = [], []
    for p in anchors.tolist():
        if float(s[p]) >= theta:  # a high anchor keeps its own feature
            rows.append(features[p])
            aggregated.append(False)
            continue
        row = weights[p].clone()
        if weighting == "convex":
            row[p] = 1.0  # w_pp = 1 (§1.4 step 3)
            row = row / row.sum()
        else:
            row = row / (row.sum() + EPS)
            if weighting == "release_llava":
                row[p] = 1.0  # §1.4 step 4: the quirk, total weight 2 − 1/Z
        rows.append(row.to(features.dtype) @ features)
        aggregated.append(True)
    return ImageResult(anchors, torch.stack(rows), torch.tensor(aggregated), theta)


# ---- the signals, from eager copies of the towers -----------------------------------------------


def _eager_copy(module):
    tower = copy.deepcopy(module)
    for sub in tower.modules():
        config = getattr(sub, "config", None)
        if config is not None:
            config._attn_implementation = "eager"
    return tower


def clip_signals(model, pixel_values: torch.Tensor):
    """§1.1 for LLaVA-1.5: per image ``(X (N, D), F (N, D), s (side, side))``."""
    cfg = model.config
    assert cfg.vision_feature_select_strategy == "default" and isinstance(cfg.vision_feature_layer, int)
    tower = _eager_copy(model.model.vision_tower)
    with torch.no_grad():
        out = tower(
            pixel_values.to(tower.dtype), output_hidden_states=True, output_attentions=True, return_dict=True
        )
    hs, att = out.hidden_states, out.attentions  # hs[k]: output of block k; att[k - 1]: its attention
    depth = len(att)
    k = cfg.vision_feature_layer % (depth + 1)  # the hidden-state index LLaVA projects (-2: block 23)
    features = hs[k][:, 1:]
    salience = att[k - 1][:, :, 0, 1:].float().sum(dim=1)  # CLS query row, patch keys, head sum
    sim_layers = range(_half_up(16 / 24 * depth), depth + 1)  # hs[16..24] of 24 → hs[1..2] of 2
    similarity = torch.stack([hs[i].float() for i in sim_layers]).mean(0)[:, 1:]
    side = math.isqrt(features.shape[1])
    return [(x, f, s.view(side, side)) for x, f, s in zip(features, similarity, salience, strict=True)]


def qwen_signals(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, official: bool):
    """§3.1 for Qwen2.5-VL: per image ``(merged embeddings (N, D), similarity (N, D), s (H, W))``."""
    visual = _eager_copy(model.model.visual)
    depth = len(visual.blocks)
    last_attn = visual.blocks[-1].attn
    outputs: dict[int, torch.Tensor] = {}
    received: list[torch.Tensor] = []  # per attention segment of the last block: (segment,)
    original = qwen_modeling.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, probs = original(module, *args, **kwargs)
        if module is last_attn:
            received.append(probs[0].float().sum(dim=1).mean(dim=0))  # sum over queries, mean over heads
        return out, probs

    def keep(index):
        return lambda _m, _a, output: outputs.__setitem__(index, output)

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(visual.blocks)]
    qwen_modeling.eager_attention_forward = recording
    try:
        with torch.no_grad():
            merged = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw).pooler_output  # raster order
            sim_blocks = range(_half_up(7 / 32 * depth), _half_up(23 / 32 * depth) + 1)  # 7..23 of 32
            mean = torch.stack([outputs[i].float() for i in sim_blocks]).mean(0)
            sim_window = visual.merger(mean.to(visual.dtype)).float()  # window order, merged
    finally:
        qwen_modeling.eager_attention_forward = original
        for handle in handles:
            handle.remove()
    merge = visual.spatial_merge_size
    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
    )
    to_raster = torch.argsort(window_index)  # window-ordered row of raster unit j: to_raster[j]
    per_unit = torch.cat(received).view(-1, merge * merge).mean(dim=1)  # mean over each merge unit
    salience = per_unit[to_raster]
    similarity = sim_window if official else sim_window[to_raster]  # §3.1 "Bug": official keeps it
    grids = (grid_thw[:, 1:] // merge).tolist()
    sizes = [h * w for h, w in grids]
    return [
        (x, f, s.view(h, w))
        for x, f, s, (h, w) in zip(
            merged.split(sizes), similarity.split(sizes), salience.split(sizes), grids, strict=True
        )
    ]


def stage1(model, inputs: dict, k1: list[int], n_per_cell: int, official: bool = False, gate=None):
    """Per image: anchors, the features the language model receives for every image token (N, D) with
    the anchors rewritten, and the :class:`ImageResult` s."""
    if "image_grid_thw" in inputs:
        signals = qwen_signals(model, inputs["pixel_values"], inputs["image_grid_thw"], official)
        gate = QWEN_GATE if gate is None else gate
        weighting = "release_qwen" if official else "convex"
    else:
        signals = clip_signals(model, inputs["pixel_values"])
        gate = LLAVA_GATE if gate is None else gate
        weighting = "release_llava" if official else "convex"
    anchors, rewritten, results = [], [], []
    for (features, similarity, salience), k in zip(signals, k1, strict=True):
        height, width = salience.shape
        if "image_grid_thw" in inputs:  # 0.8 × the diagonal of the even-padded grid
            ph, pw = height + height % 2, width + width % 2
            tau = QWEN_TAU_SCALE * math.hypot(ph - 1, pw - 1)
        else:
            tau = math.sqrt(LLAVA_DIST_SQ)
        chosen = separation_and_alignment(salience, n_per_cell, k)
        result = aggregate_image(features, similarity, salience, chosen, tau, gate, weighting)
        full = features.clone()
        full[chosen] = result.features
        if "image_grid_thw" not in inputs:  # LLaVA aggregates before its projector (§1.1)
            with torch.no_grad():
                full = model.model.multi_modal_projector(full[None])[0]
        anchors.append(chosen)
        rewritten.append(full)
        results.append(result)
    return anchors, rewritten, results


# ---- stage 2: the decoder driven by hand --------------------------------------------------------


def _decoder(model):
    inner = model.model  # LLaVA, LLaVA-NeXT, Qwen: language_model; Idefics3 / SmolVLM: text_model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def embeddings_and_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The untouched model's merged input embeddings ``(1, N, D)`` and position ids (Qwen: (3, 1, N))."""
    captured = {}

    def grab(_module, _args, kwargs):
        captured.update(kwargs)
        raise StopIteration

    handle = _decoder(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except StopIteration:
        pass
    finally:
        handle.remove()
    embeds, pos = captured["inputs_embeds"], captured.get("position_ids")
    if pos is None:
        pos = torch.arange(embeds.shape[1])[None]
    if pos.ndim == 3 and pos.shape[0] == 4:  # Qwen packs text positions first
        pos = pos[1:]
    return embeds, pos


def _causal_mask(keep_positions: torch.Tensor, dtype) -> torch.Tensor:
    n = keep_positions.numel()
    mask = torch.zeros(n, n, dtype=dtype)
    mask[~torch.ones(n, n, dtype=torch.bool).tril()] = torch.finfo(dtype).min
    return mask[None, None]


def _rope(model, hidden, position_ids):
    return _decoder(model).rotary_emb(hidden, position_ids)


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
    with torch.no_grad():
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
            hidden[:, idx] = layer(
                h, attention_mask=_causal_mask(idx, h.dtype), position_embeddings=(cos, sin)
            )
        logits = model.lm_head(decoder.norm(hidden))[0]
    return logits, scores
