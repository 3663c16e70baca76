"""VisionZip (arXiv 2412.04467) on the multi-view families: LLaVA-NeXT / OneVision (base view + crops +
newlines), Idefics3 / SmolVLM (tiles + global view) and InternVL (tiles + thumbnail).

Kept tokens and rewritten rows are checked against the formulas applied to signals read independently
(``visionzip_reference``), logits against ``nuwa_reference``'s hand-driven decoder; newlines are never
picked; several images per prompt; ``generate()``'s early encoding; settings a tap cannot read.
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_inputs, small_model_for, split_sample
from nuwa_reference import nuwa_reference
from stage1_support import generate_matches_forward
from visionzip_reference import (
    internvl_reference_signals,
    shuffle_reference_signals,
    view_reference_signals,
    zip_reference,
)

from vlm_reroute.methods import VisionZip


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_multi_view_engine_matches_the_reference(family):
    """LLaVA-NeXT (CLIP, [CLS]) and OneVision (SigLIP, received): VisionZip among the view cells of
    the whole image; newline tokens never picked nor merged; logits = the hand-driven decoder."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    packed, salience, keys, newlines = view_reference_signals(model, inputs)
    with VisionZip(dominant=9, contextual=4)(model) as trace:
        logits = model(**inputs).logits[0]
    cells = torch.ones(packed.shape[0], dtype=torch.bool)
    cells[newlines] = False
    at = cells.nonzero().flatten()
    picked, rows = zip_reference(packed[at], salience[at], keys[at], 9, 4)
    kept = at[picked]
    rewritten = packed.clone()
    rewritten[at] = rows
    record = trace.stage1[0][0]
    assert record.anchors.tolist() == kept.tolist() and record.newlines.numel() == 0
    assert record.views == ((4, 4), (8, 4)) and newlines.numel() == 8
    assert trace.decisions[0].selected[0].tolist() == kept.tolist()
    ref, _ = nuwa_reference(model, inputs, [rewritten], [kept], [4], [kept], False)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-4, atol=1e-4)


def test_newlines_enter_only_above_the_cells():
    """K₁ between the cells (48) and all tokens (56): every cell, then the first newlines."""
    model = small_model_for("llava_next")
    inputs = small_inputs(model, (20,), seed=3)
    with VisionZip(dominant=45, contextual=5)(model) as trace:
        model(**inputs)
    record = trace.stage1[0][0]
    assert record.newlines.tolist() == [20, 25] and record.anchors.numel() == 50
    assert trace.decisions[0].kept == [50]


@pytest.mark.parametrize(
    ("family", "reference"),
    [
        ("idefics3", shuffle_reference_signals),
        ("smolvlm", shuffle_reference_signals),
        ("internvl", internvl_reference_signals),
    ],
)
def test_tiled_engine_matches_the_reference(family, reference):
    """Idefics3 / SmolVLM (received attention) and InternVL ([CLS] salience): VisionZip over all views
    of the image (3 tiles + the global view / thumbnail, 64 tokens)."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    rows, salience, keys = reference(model, inputs)
    with VisionZip(dominant=9, contextual=4)(model) as trace:
        logits = model(**inputs).logits[0]
    kept, rewritten = zip_reference(rows, salience, keys, 9, 4)
    record = trace.stage1[0][0]
    assert record.anchors.tolist() == kept and record.views == ((4, 4),) * 4
    assert trace.decisions[0].selected[0].tolist() == kept
    kept = torch.tensor(kept)
    ref, _ = nuwa_reference(model, inputs, [rewritten], [kept], [4], [kept], False)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["internvl", "idefics3"])
def test_generate_rewrites_the_encoding_it_made_before_the_prefill(family):
    """``generate()`` encodes before its first forward; the prefill's prompt groups the views then: the
    first generated token's logits equal the routed forward's, with the same anchors."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20, 13), seed=5)
    method = VisionZip(dominant=6, contextual=2)
    generate_matches_forward(model, inputs, method, 1)
    encoded = model.model.get_image_features(inputs["pixel_values"], return_dict=True)  # before the block
    rest = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_attention_mask")}
    with method(model), pytest.raises(ValueError, match="was not encoded inside the block"):
        model(**rest, mm_encoder_outputs={"image": encoded})


@pytest.mark.parametrize("family", ["internvl", "idefics3", "smolvlm"])
def test_several_images_per_prompt(family):
    """Two prompts of two images each: every image keeps K₁ of its own views, and each prompt decides
    alone as in the batch."""
    from vlm_reroute.testing.family_inputs import tiny_family_inputs

    model = small_model_for(family)
    sizes = (((100, 300), (60, 60)), ((300, 100), (120, 90)))
    inputs = tiny_family_inputs(family, sizes=sizes, questions=("what is it", "and this"))
    with VisionZip(dominant=5, contextual=2)(model) as trace:
        batch = model(**inputs).logits[:, -1]
    records = [r for sample in trace.stage1 for r in sample]
    assert len(records) == 4 and all(r.anchors.numel() == 7 for r in records)
    assert len({len(r.views) for r in records}) > 1  # images of several view counts
    for b in range(2):
        with VisionZip(dominant=5, contextual=2)(model):
            alone = model(**split_sample(inputs, b)).logits[0, -1]
        torch.testing.assert_close(batch[b], alone, rtol=1e-4, atol=1e-4)


def test_anyres_prompts_with_several_images():
    """LLaVA-NeXT, the default tiny prompts (one image, then two of other sizes): every image keeps K₁
    tokens, none a newline, and each prompt decides alone as in the batch."""
    from vlm_reroute.testing.family_inputs import tiny_family_inputs

    model = small_model_for("llava_next")
    sizes = (((150, 80), (60, 100)), ((80, 150), (56, 56)))  # split_sample: as many images per prompt
    inputs = tiny_family_inputs("llava_next", sizes=sizes, questions=("what is it", "and this"))
    with VisionZip(dominant=5, contextual=2)(model) as trace:
        batch = model(**inputs).logits[:, -1]
    records = [r for sample in trace.stage1 for r in sample]
    assert len(records) == 4
    for r in records:
        assert r.anchors.numel() == 7 and r.newlines.numel() == 0 and r.dominant.numel() == 5
        side, (rows, cols) = r.views[0][0], r.views[-1]
        newline_at = {side * side + i * (cols + 1) + cols for i in range(rows)}
        assert not newline_at & set(r.anchors.tolist())
    for b in range(2):
        with VisionZip(dominant=5, contextual=2)(model):
            alone = model(**split_sample(inputs, b)).logits[0, -1]
        torch.testing.assert_close(batch[b], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("family", "setting", "value", "match"),
    [
        (
            "llava_next",
            "vision_feature_layer",
            [-2, -1],
            r"vision_feature_layer=\[-2, -1\]: a stage-1 salience reads one block",
        ),
        ("llava_next", "vision_feature_select_strategy", "full", r"'full' on a tower with a \[CLS\] token"),
        (
            "llava_onevision",
            "vision_feature_select_strategy",
            "default",
            r"'default' on a tower without a \[CLS\]",
        ),
        ("internvl", "vision_feature_select_strategy", "full", r"needs the \[CLS\] token dropped"),
    ],
)
def test_tower_settings_a_tap_cannot_read_are_refused(monkeypatch, family, setting, value, match):
    model = small_model_for(family)
    monkeypatch.setattr(model.config, setting, value)
    with pytest.raises(ValueError, match=match) as info, VisionZip()(model):
        pass
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("sizes", "views"),
    [
        ((((336, 300),),), [((4, 4), (12, 11))]),  # 6x6 crops > anyres_max_9: shrunk bilinearly to 12x11
        ((((100, 300), (60, 60)),), [((4, 4),), ((4, 4),)]),  # two images in a prompt: base view + 1 newline
    ],
)
def test_onevision_shrunk_grids_and_base_only_images(sizes, views):
    """OneVision's other packings: the signals go through the same shrink / base-only packing, no
    newline is ever picked, and keep-all stays bit for bit."""
    from vlm_reroute.testing.family_inputs import tiny_family_inputs

    model = small_model_for("llava_onevision")
    inputs = tiny_family_inputs("llava_onevision", sizes=sizes, questions=("what is it",))
    vanilla = model(**inputs).logits
    with VisionZip(k=1.0)(model):
        assert torch.equal(model(**inputs).logits, vanilla)
    with VisionZip(dominant=5, contextual=2)(model) as trace:
        model(**inputs)
    assert [r.views for r in trace.stage1[0]] == views
    for record in trace.stage1[0]:
        side, rows_cols = record.views[0][0], record.views[1:]
        rows, cols = rows_cols[0] if rows_cols else (1, -1)
        newline_at = (
            {side * side + i * (cols + 1) + cols for i in range(rows)} if rows_cols else {side * side}
        )
        assert record.anchors.numel() == 7 and not newline_at & set(record.anchors.tolist())


@pytest.mark.parametrize("family", ["llava_next", "internvl", "idefics3"])
def test_leaving_the_block_restores_the_model(family):
    """The shadowed method lives on the instance only while the method is applied; hooks are gone after."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    model(**inputs)  # transformers installs its own output-recording hooks on a first forward
    inner = model.model
    name = "pack_image_features" if family == "llava_next" else "get_image_features"
    before = dict(inner.__dict__)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with VisionZip(k=8)(model):
        assert name in inner.__dict__ and getattr(type(inner), name) is not inner.__dict__[name]
        model(**inputs)
    assert name not in inner.__dict__ and inner.__dict__.keys() == before.keys()
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("form", ["bool", "additive", "flat"])
def test_padded_patches_are_no_keys_and_count_no_queries(form):
    """Idefics3's padded patches (a block mask in sdpa's bool, eager's additive or flash's (V, N) form):
    the received attention of ``received_rows`` equals a float64 softmax over the valid patches only."""
    from vlm_reroute.adapters.vision_views import received_rows

    block = small_model_for("idefics3").model.vision_model.encoder.layers[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 32, generator=gen)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 6:] = False
    allowed = valid[:, None, None, :].expand(2, 1, 9, 9)
    mask = {
        "bool": allowed,
        "additive": torch.where(allowed, 0.0, torch.finfo(torch.float32).min),
        "flat": valid,
    }
    received, _ = received_rows(block, hidden, mask[form])
    attn = block.self_attn
    norm = block.layer_norm1
    x = torch.nn.functional.layer_norm(
        hidden.double(), (32,), norm.weight.double(), norm.bias.double(), norm.eps
    )
    heads = attn.num_heads
    q = (x @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()).unflatten(-1, (heads, -1))
    k = (x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()).unflatten(-1, (heads, -1))
    for v in range(2):
        idx = valid[v].nonzero().flatten()
        probs = (torch.einsum("qhd,khd->hqk", q[v, idx], k[v, idx]) * attn.scale).softmax(-1)
        expected = torch.zeros(9, dtype=torch.float64)
        expected[idx] = probs.sum(dim=(0, 1))
        torch.testing.assert_close(received[v].double(), expected, rtol=1e-4, atol=1e-5)
