"""VisionZip (arXiv 2412.04467): its dominant and contextual tokens, and the stage in the engine.

The formulas are written in ``visionzip_reference.py`` from ``methods.md`` §4 (one image, loops):
dominant = the D highest salience; contextual = C targets at stride ``max(1, ⌊R/C⌋)`` among the R
remaining tokens (ascending), each other remaining token assigned to its most key-cosine-similar
target, ``h_target + mean(h_assigned)``. The signals are read from eager copies of the towers
(``output_attentions`` for CLIP's [CLS] row, the eager attention weights for the Qwen ViT's column
sums); the logits are checked against ``nuwa_reference``'s hand-driven decoder on text + the kept
tokens at their original positions. The multi-view families: ``test_visionzip_views.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen_modeling
from conftest import small_inputs, small_model_for
from nuwa_reference import nuwa_reference
from transformers.vision_utils import get_vision_window_index
from visionzip_reference import zip_reference

from vlm_reroute.adapters.vision import column_sums
from vlm_reroute.methods import FastV, MethodSpec, PDrop, VisionZip
from vlm_reroute.methods.visionzip import split
from vlm_reroute.scoring.visionzip import visionzip_select


@pytest.mark.parametrize(("n", "dominant", "contextual"), [(20, 5, 3), (30, 0, 7), (16, 12, 0), (9, 2, 7)])
def test_formulas(n, dominant, contextual):
    gen = torch.Generator().manual_seed(n)
    h, s, k = torch.randn(n, 6, generator=gen), torch.rand(n, generator=gen), torch.randn(n, 4, generator=gen)
    done = visionzip_select(h, s, k, dominant, contextual)
    kept, rows = zip_reference(h, s, k, dominant, contextual)
    assert done.kept.tolist() == kept and done.dominant.numel() == dominant
    assert done.targets.numel() == contextual
    torch.testing.assert_close(done.features, rows, rtol=1e-6, atol=1e-6)


def test_the_reference_tiers_split_as_published():
    assert [split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def test_column_sums_by_tiles_equal_the_full_matrix():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(13, 2, 4, generator=gen), torch.randn(13, 2, 4, generator=gen)
    bounds = [0, 5, 13]
    expected = torch.zeros(13)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        probs = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]).softmax(-1)
        expected[a:b] = probs.sum(dim=(0, 1))
    for max_elements in (1, 16, 1 << 20):
        torch.testing.assert_close(column_sums(q, k, bounds, max_elements), expected)


def test_column_sums_leave_out_padded_tokens():
    """Idefics3's padded patches: no key (probability 0) and no query row counted, per segment."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(12, 2, 4, generator=gen), torch.randn(12, 2, 4, generator=gen)
    valid = torch.tensor([True] * 4 + [False] * 2 + [True] * 5 + [False])
    bounds = [0, 6, 12]
    expected = torch.zeros(12)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        idx = [i for i in range(a, b) if valid[i]]
        probs = torch.einsum("qhd,khd->hqk", q[idx], k[idx]).softmax(-1)
        expected[idx] = probs.sum(dim=(0, 1))
    for max_elements in (1, 16, 1 << 20):
        torch.testing.assert_close(column_sums(q, k, bounds, max_elements, valid), expected)


def clip_reference_signals(model, pixel_values):
    """LLaVA: ``(rows (N, D), [CLS] salience (N,), keys (N, h))`` from an eager copy of the tower."""
    tower = copy.deepcopy(model.model.vision_tower)
    for sub in tower.modules():
        if getattr(sub, "config", None) is not None:
            sub.config._attn_implementation = "eager"
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True)
        depth = len(out.attentions)
        index = model.config.vision_feature_layer % (depth + 1)
        block = getattr(tower, "vision_model", tower).encoder.layers[index - 1]
        salience = out.attentions[index - 1][0, :, 0, 1:].sum(dim=0)  # attn[-2][:, :, 0, 1:], head sum
        raw = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[index - 1]))[0]
        keys = raw.view(raw.shape[0], block.self_attn.num_heads, -1).mean(dim=1)[1:]
        rows = model.model.multi_modal_projector(out.hidden_states[index][:, 1:])[0]
    return rows, salience, keys


def qwen_reference_signals(model, inputs):
    """Qwen2.5-VL: merged rows, attention received in block −2 (eager weights) and its raw keys, per
    merged token in raster order."""
    visual = copy.deepcopy(model.model.visual)
    for sub in visual.modules():
        if getattr(sub, "config", None) is not None:
            sub.config._attn_implementation = "eager"
    block = visual.blocks[max(-2, -len(visual.blocks))]
    received, seen = [], {}
    original = qwen_modeling.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, probs = original(module, *args, **kwargs)
        if module is block.attn:
            received.append(probs[0].float().sum(dim=(0, 1)))  # over heads and queries
        return out, probs

    handle = block.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    qwen_modeling.eager_attention_forward = recording
    try:
        with torch.no_grad():
            rows = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
            x = seen["x"]
            raw = block.attn.qkv(block.norm1(x)).view(x.shape[0], 3, block.attn.num_heads, -1)[:, 1]
    finally:
        qwen_modeling.eager_attention_forward = original
        handle.remove()
    unit = visual.spatial_merge_size**2
    window, _ = get_vision_window_index(
        inputs["image_grid_thw"], visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    order = torch.argsort(window)
    salience = torch.cat(received).view(-1, unit).mean(dim=1)[order]
    keys = raw.float().mean(dim=1).view(-1, unit, raw.shape[-1]).mean(dim=1)[order]
    return rows, salience, keys


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_engine_matches_the_reference(family):
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    if family == "llava":
        rows, salience, keys = clip_reference_signals(model, inputs["pixel_values"])
    else:
        rows, salience, keys = qwen_reference_signals(model, inputs)
    with VisionZip(dominant=10, contextual=4)(model) as trace:
        logits = model(**inputs).logits[0]
    kept, rewritten = zip_reference(rows, salience, keys, 10, 4)
    record = trace.stage1[0][0]
    assert record.anchors.tolist() == kept and record.dominant.numel() == 10
    assert trace.decisions[0].selected[0].tolist() == kept
    kept = torch.tensor(kept)
    ref, _ = nuwa_reference(model, inputs, [rewritten], [kept], [4], [kept], False)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-4, atol=1e-4)


def test_composition_and_spec():
    model = small_model_for("qwen2_5_vl")
    inputs = small_inputs(model, (20,), seed=3)
    method = VisionZip(k=24) + FastV(layers=[2, 4, 6], keep=8, reroute=True)
    with method(model) as trace:
        model(**inputs)
    assert method.name == "VisionZip + FastV + Reroute"
    assert [d.layer for d in trace.decisions] == [0, 2, 4, 6]
    assert [d.kept for d in trace.decisions] == [[24], [8], [8], [8]]
    spec = MethodSpec.parse("visionzip+pdrop", tier=16, dominant=20, contextual=4)
    built = spec.build()
    assert (
        isinstance(built.then, PDrop)
        and built.entry_setting() == 24
        and spec.label.startswith("VisionZip + PDrop")
    )


def test_a_family_without_a_tap_is_refused_in_one_line(monkeypatch):
    """Every family has a tap now; an adapter without one (a new family) gets ``require_tap``'s line."""
    from vlm_reroute.adapters.internvl import InternVLAdapter

    monkeypatch.setattr(InternVLAdapter, "vision_tap", lambda self: None)
    model = small_model_for("internvl")
    with (
        pytest.raises(ValueError, match=r"VisionZip needs a vision-side salience .* InternVLAdapter") as info,
        VisionZip()(model),
    ):
        pass
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dominant": 5}, r"dominant=5, contextual=None\): give both"),
        ({"dominant": -1, "contextual": 2}, r"dominant=-1\): a token count ≥ 0"),
        ({"dominant": 0, "contextual": 0}, r"at least one token must enter"),
        ({"dominant": 4, "contextual": 2, "k": 6}, r"give dominant= with contextual=, or k=, or target="),
        ({"k": 2.0}, r"keep=2.0\): a keep ratio must be in \(0, 1\]"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        VisionZip(**kwargs)
    assert "\n" not in str(info.value)


def test_a_budget_larger_than_the_image_is_one_line():
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=3)
    too_many = VisionZip(dominant=60, contextual=10)
    with (
        pytest.raises(ValueError, match=r"VisionZip: 70 tokens per image enter .* image here has 64"),
        too_many(model),
    ):
        model(**inputs)


def test_the_command_line_runs_a_composed_method(tmp_path_factory):
    """``vlm-reroute run --method visionzip+pdrop --reroute --tier 20``: VisionZip's 64 tokens enter,
    PDrop + Reroute is solved for avg_T 20 over them (the tiny Qwen2-VL checkpoint)."""
    import json

    from cli_support import invoke, saved_checkpoints, saved_images

    checkpoint = saved_checkpoints(tmp_path_factory)["qwen2_vl"]
    image = saved_images(tmp_path_factory)["big"]
    args = ["--model", checkpoint, "--image", image, "--prompt", "what?", "--method", "visionzip+pdrop"]
    result = invoke("run", *map(str, args), "--reroute", "--tier", "20", "--json", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "VisionZip + PDrop + Reroute", report
    assert report["decisions"][0] == {"layer": 0, "kept": 64, "reentered": 0}
    assert report["schedule"]["layers"][0] == 0 and report["schedule"]["keep"][0] == 64
    assert abs(report["avg_visual_tokens"] - 20) <= 0.5
