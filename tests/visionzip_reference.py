"""VisionZip's references (arXiv 2412.04467), written from ``methods.md`` §4 and the families' modeling
code; nothing here comes from ``vlm_reroute``.

:func:`zip_reference`: the dominant / contextual formulas on one image with loops (float64 merging).
The multi-view readers give each language-model token of one image its salience and keys, computed
per view from the tower's own block input (eager attention or float64 by hand), and mapped to tokens
without the library's packing code: LLaVA-NeXT / OneVision by matching each packed row to the view
patch it came from; InternVL and Idefics3 / SmolVLM by writing the pixel shuffle out as loops.
"""

from __future__ import annotations

import copy

import torch


def zip_reference(h, salience, keys, dominant, contextual):
    """``(kept indices ascending, rewritten rows)`` from the published formulas, with loops."""
    n = h.shape[0]
    ranked = sorted(range(n), key=lambda i: (-float(salience[i]), i))
    top = sorted(ranked[:dominant])
    rest = sorted(ranked[dominant:])
    out = h.clone()
    if contextual == 0:
        return top, out
    stride = max(1, len(rest) // contextual)
    targets = [rest[i] for i in range(0, len(rest), stride)][:contextual]
    others = [j for j in rest if j not in targets]
    unit = keys.double() / keys.double().norm(dim=1, keepdim=True)
    members = {t: [] for t in targets}
    for j in others:
        sims = [float(unit[j] @ unit[t]) for t in targets]
        members[targets[max(range(len(targets)), key=lambda c: (sims[c], -c))]].append(j)
    for t in targets:
        mean = torch.stack([h[j].double() for j in members[t]]).mean(0) if members[t] else 0.0
        out[t] = (h[t].double() + mean).to(h.dtype)
    return sorted(top + targets), out


def eager_anyres_pass(model, inputs):
    """LLaVA-NeXT / OneVision, one image, through an eager copy of the tower: ``(tower, packed rows
    (N, D), the tower's output with hidden states and attentions, has [CLS], index of the block read
    — the feature-layer block with [CLS], block −2 without)``."""
    inner, cfg = model.model, model.config
    tower = copy.deepcopy(inner.vision_tower)
    for sub in tower.modules():
        if getattr(sub, "config", None) is not None:
            sub.config._attn_implementation = "eager"
    crops = inputs["pixel_values"][0]
    with torch.no_grad():
        packed = inner.get_image_features(crops[None], inputs["image_sizes"]).pooler_output[0]
        out = tower(crops, output_hidden_states=True, output_attentions=True, return_dict=True)
    depth = len(out.attentions)
    cls = cfg.vision_feature_select_strategy == "default"
    index = cfg.vision_feature_layer % (depth + 1) - 1 if cls else depth - 2
    return tower, packed, out, cls, index


def view_reference_signals(model, inputs):
    """LLaVA-NeXT / OneVision, one image: ``(packed rows (N, D), salience (N,), keys (N, h), newline
    indices)``. Per view from an eager copy of the tower: CLIP's [CLS] row of the feature-layer block
    summed over heads (``attn[:, :, 0, 1:]``), SigLIP's attention received in block −2 (its full eager
    weights summed over heads and queries); keys of that block averaged over heads. Each packed token
    gets the signals of the view patch whose projected row it *is* (nearest row, checked within 1e-4):
    no packing arithmetic is repeated here; a row equal to ``image_newline`` is a newline."""
    inner, cfg = model.model, model.config
    tower, packed, out, cls, index = eager_anyres_pass(model, inputs)
    with torch.no_grad():
        block = getattr(tower, "vision_model", tower).encoder.layers[index]
        probs = out.attentions[index]
        salience = probs[:, :, 0, 1:].sum(dim=1) if cls else probs.sum(dim=(1, 2))
        raw = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[index]))
        keys = raw.view(*raw.shape[:2], block.self_attn.num_heads, -1).mean(dim=2)[:, int(cls) :]
        rows = inner.multi_modal_projector(out.hidden_states[cfg.vision_feature_layer][:, int(cls) :])
    newline = (packed == inner.image_newline).all(dim=-1)
    distance = torch.cdist(packed.double(), rows.flatten(0, 1).double())
    nearest = distance.min(dim=1)
    assert bool((nearest.values[~newline] < 1e-4).all())
    source = nearest.indices
    sal = torch.where(newline, 0.0, salience.flatten()[source])
    key = torch.where(newline[:, None], 0.0, keys.flatten(0, 1)[source])
    return packed, sal, key, newline.nonzero().flatten()


def shuffle_reference_signals(model, inputs):
    """Idefics3 / SmolVLM, one image: ``(rows (N, D), salience (N,), keys (N, h))``. Per view (tiles, then
    the global view), in float64 from block −2's input: the full softmax of every head, summed over heads
    and queries (the attention each patch receives), and the keys averaged over heads; token ``(a, b)``
    of a view's ``T × T`` grid holds patches ``(a·s + i, b·s + j)``, ``0 ≤ i, j < s`` (the pixel
    shuffle written out) and gets their mean."""
    inner = model.model
    block = inner.vision_model.encoder.layers[-2]
    seen = {}

    def grab(_module, args):
        seen["x"] = args[0]  # returns None: the block's input is left as it is

    handle = block.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            rows = inner.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
    finally:
        handle.remove()
    x = seen["x"].double()
    attn = block.self_attn
    normed = torch.nn.functional.layer_norm(
        x,
        x.shape[-1:],
        block.layer_norm1.weight.double(),
        block.layer_norm1.bias.double(),
        block.layer_norm1.eps,
    )
    heads = attn.num_heads
    q = (normed @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()).unflatten(-1, (heads, -1))
    k = (normed @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()).unflatten(-1, (heads, -1))
    probs = (torch.einsum("vqhd,vkhd->vhqk", q, k) * attn.scale).softmax(dim=-1)
    received, keys = probs.sum(dim=(1, 2)), k.mean(dim=2)  # (V, P), (V, P, h)
    scale = model.config.scale_factor
    side = int(received.shape[1] ** 0.5)
    tokens = side // scale
    salience, key = [], []
    for v in range(received.shape[0]):  # loops over views and tokens
        for a in range(tokens):
            for b in range(tokens):
                held = [(a * scale + i) * side + b * scale + j for i in range(scale) for j in range(scale)]
                salience.append(received[v, held].mean())
                key.append(keys[v, held].mean(dim=0))
    return rows.pooler_output[0], torch.stack(salience), torch.stack(key)


def internvl_reference_signals(model, inputs):
    """InternVL, one image: ``(rows (N, D), salience (N,), keys (N, h))``. Per tile, in float64 from the
    feature-layer block's input: the [CLS] query row's softmax over all ``1 + P`` keys summed over heads
    (patches only) and the patch keys averaged over heads; token ``(i, j)`` of a tile holds patches
    ``(2i + a, 2j + b)`` (the 0.5 pixel shuffle written out) and gets their mean."""
    inner = model.model
    layers = inner.vision_tower.encoder.layer
    block = layers[model.config.vision_feature_layer % (len(layers) + 1) - 1]
    seen = {}

    def grab(_module, args):
        seen["x"] = args[0]

    handle = block.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            rows = inner.get_image_features(inputs["pixel_values"]).pooler_output.flatten(0, 1)
    finally:
        handle.remove()
    attn, x = block.attention, seen["x"].double()
    norm = block.layernorm_before
    normed = torch.nn.functional.layer_norm(
        x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps
    )
    heads = attn.num_heads
    q = (normed[:, :1] @ attn.q_proj.weight.double().T).unflatten(-1, (heads, -1))  # no bias, no q/k norm
    k = (normed @ attn.k_proj.weight.double().T).unflatten(-1, (heads, -1))
    assert attn.q_proj.bias is None and isinstance(attn.q_norm, torch.nn.Identity)
    probs = (torch.einsum("vqhd,vkhd->vhqk", q, k) * attn.scale).softmax(dim=-1)[:, :, 0, 1:]
    received, keys = probs.sum(dim=1), k[:, 1:].mean(dim=2)
    side = int(received.shape[1] ** 0.5)
    salience, key = [], []
    for v in range(received.shape[0]):  # loops over tiles and tokens
        for i in range(side // 2):
            for j in range(side // 2):
                held = [(2 * i + a) * side + 2 * j + b for a in range(2) for b in range(2)]
                salience.append(received[v, held].mean())
                key.append(keys[v, held].mean(dim=0))
    return rows, torch.stack(salience), torch.stack(key)
