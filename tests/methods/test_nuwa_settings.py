"""Nüwa in the engine, continued: settings that do not fit the model, the one composition rule of
stage-1 methods, and the merger-ViT families (split from ``test_nuwa_engine.py``)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_inputs, small_model_for
from nuwa_reference import nuwa_reference, separation_and_alignment, stage1
from nuwa_support import FAMILIES

from vlm_reroute import FastV, Nuwa
from vlm_reroute.methods import MethodSpec, PDrop

# ---- settings that do not fit the model ---------------------------------------------------------


def apply(method, model, inputs=None):
    with method(model):
        if inputs is not None:
            model(**inputs)


def test_a_model_outside_the_family_table_is_refused_in_one_line():
    """Every family of the table has a release now (the multi-view ones run per view:
    ``test_nuwa_views.py``); a model class the table does not list gets one line naming the families."""
    from vlm_reroute.methods.nuwa.release import release_for

    class ImaginaryForConditionalGeneration:
        pass

    with pytest.raises(
        TypeError, match=r"Nüwa is defined for LLaVA-1.5 \(LlavaForConditionalGeneration\), "
    ) as info:
        release_for(ImaginaryForConditionalGeneration())
    message = str(info.value)
    assert "\n" not in message and message.endswith(
        "ImaginaryForConditionalGeneration needs its own stage-1 signals"
    )
    assert "LLaVA-NeXT (LlavaNextForConditionalGeneration)" in message and "SmolVLM" in message


def test_errors_for_settings_that_do_not_fit():
    llava, qwen = small_model_for("llava"), small_model_for("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"K₁ = 112 anchors per image, but an image of 8×8 = 64 tokens"):
        apply(Nuwa(budget=64), llava)  # refused when applied: LLaVA's grid is fixed
    with pytest.raises(ValueError, match=r"propose at most 16 candidates with n_per_cell=1"):
        apply(Nuwa(k1=20, k2=4, n_per_cell=1), llava)
    with pytest.raises(ValueError, match=r"stage-2 layer 8 .* so stage-2 decisions must be in 1\.\.7"):
        apply(Nuwa(k1=16, k2=4, stage2_layer=8), llava)
    with pytest.raises(ValueError, match=r"budget=64\) is the LLaVA-1.5 release's setting"):
        apply(Nuwa(budget=64), qwen)
    with pytest.raises(ValueError, match=r"ratio=0.5\) is the Qwen2.5-VL release's setting"):
        apply(Nuwa(ratio=0.5), llava)
    inputs = small_inputs(qwen, (20,))
    with pytest.raises(ValueError, match=r"K₁ = 100 anchors per image, but an image of 8×8 = 64 tokens"):
        apply(Nuwa(k1=100, k2=4), qwen, inputs)  # Qwen grids vary: refused when the image arrives
    encoded = qwen.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    precomputed = {k: v for k, v in inputs.items() if k != "pixel_values"}
    precomputed["mm_encoder_outputs"] = {"image": encoded}
    with pytest.raises(ValueError, match="image 0 of this prompt was not encoded inside the block"):
        apply(Nuwa(k1=16, k2=4), qwen, precomputed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 100}, r"budgets are 64, 128 and 192"),
        ({"ratio": 0.3}, r"ratios are 0.25, 0.5 and 0.75"),
        ({"budget": 64, "k1": 3, "k2": 1}, r"give one of budget=, ratio=, k1= with k2=, target=; got budget"),
        ({"k2": 4}, r"k2=4\): give k1 too"),
        ({"k1": 8, "k2": 4, "then": FastV(keep=2)}, r"the in-decoder method decides k2"),
        ({"k1": 4, "k2": 8}, r"stage 2 keeps at most the anchors"),
        ({"k1": 8, "k2": 4, "layers": [4, 6]}, r"Nüwa prunes once in stage 2"),
        ({"k1": 8, "k2": 4, "stage2_layer": 3, "layers": [4, 6], "reroute": True}, r"first stage-2 decision"),
        ({"k1": 8, "k2": 4, "n_per_cell": 5}, r"n_per_cell=5\): a 2×2 cell proposes 1, 2, 3 or 4"),
        ({"k1": 8, "k2": 4, "gate_quantile": 1.5}, r"gate_quantile=1.5\): a quantile in \[0, 1\]"),
        ({"k1": 8, "k2": 4, "stage2_layer": 0}, r"stage2_layer=0\): a decoder layer index ≥ 1"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Nuwa(**kwargs)


# ---- one composition rule for stage-1 methods (methods/stage1.py) ------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_composes_with_an_in_decoder_method(family):
    """``Nuwa(k1=...) + PDrop(...)``: Nüwa's anchors enter unchanged, PDrop's schedule replaces stage 2
    (its counts taken of the anchors), and the logits equal the reference driven with those decisions."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    with Nuwa(k1=24, k2=6)(model) as alone:
        model(**inputs)
    composed = Nuwa(k1=24) + PDrop(layers=[2, 5], keep=[0.5, 0.25], reroute=True)
    with composed(model) as trace:
        logits = model(**inputs).logits[0]
    assert composed.name == "Nüwa + PDrop + Reroute" and composed.reroute
    record = trace.stage1[0][0]
    assert torch.equal(record.anchors, alone.stage1[0][0].anchors)
    assert [d.layer for d in trace.decisions] == [0, 2, 5]
    assert [d.kept for d in trace.decisions] == [[24], [12], [6]]
    anchors, features, _ = stage1(model, inputs, [24], record.n_per_cell)
    selected = [d.selected[0] for d in trace.decisions[1:]]
    ref, _ = nuwa_reference(model, inputs, features, anchors, [2, 5], selected, True)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-4, atol=1e-4)


def test_nuwa_spec_strings_compose():
    spec = MethodSpec.parse("nuwa+fastv", tier=10, k1=24)
    method = spec.build()
    assert spec.name == "Nüwa + FastV" and isinstance(method.then, FastV) and method.k1 == 24
    assert Nuwa(k1=24).replace(then=FastV(keep=4)).make_scorer() == FastV(keep=4).make_scorer()
    with pytest.raises(TypeError, match=r"the stage-1 method comes first"):
        FastV() + Nuwa()


# ---- the merger-ViT families (Qwen2-VL, Qwen3-VL, Qwen3.5): the Qwen2.5-VL release without windows ----


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_merger_towers_run_the_qwen_release(family):
    """The anchors are the reference's rule on salience read from the untouched tower: the attention
    each patch receives in the last block (eager weights), averaged over merge units, raster order."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    layers = {"qwen3_5": {"stage2_layer": 4}}.get(family, {})  # Qwen3.5 scores at full-attention layers
    method = Nuwa(k1=24, k2=6, **layers)
    with method(model) as trace:
        model(**inputs)
    record = trace.stage1[0][0]
    assert record.anchors.numel() <= 24 and [d.kept for d in trace.decisions] == [
        [record.anchors.numel()],
        [6],
    ]
    assert torch.equal(trace.decisions[0].selected[0], record.anchors)
    salience = eager_received(model, inputs).view(record.grid)
    torch.testing.assert_close(trace.decisions[0].scores[0], salience.flatten(), rtol=1e-4, atol=1e-6)
    assert torch.equal(record.anchors, separation_and_alignment(salience, record.n_per_cell, 24))


def eager_received(model, inputs) -> torch.Tensor:
    """Attention each merged token receives in the last block of an eager copy of a window-free Qwen
    tower: the weights its module's eager attention returns, summed over queries, mean over heads,
    mean over each merge unit (``nuwa.md`` §3.1 steps 1-3; no window order to undo)."""
    import copy
    import sys

    visual = copy.deepcopy(model.model.visual)
    for sub in visual.modules():
        if getattr(sub, "config", None) is not None:
            sub.config._attn_implementation = "eager"
    modeling = sys.modules[type(visual).__module__]
    original, received = modeling.eager_attention_forward, []

    def recording(module, *args, **kwargs):
        out, probs = original(module, *args, **kwargs)
        if module is visual.blocks[-1].attn:
            received.append(probs[0].float().sum(dim=1).mean(dim=0))
        return out, probs

    modeling.eager_attention_forward = recording
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        modeling.eager_attention_forward = original
    return torch.cat(received).view(-1, visual.spatial_merge_size**2).mean(dim=1)


def test_qwen3_5_refuses_a_stage2_layer_it_cannot_score_in_one_line():
    """Nüwa's Qwen stage 2 scores with the layer before (the release's): on the hybrid Qwen3.5 that
    layer must be a full-attention one; the default reroute spread (4, 5, 6, 7) is refused too."""
    model = small_model_for("qwen3_5")
    for method in (Nuwa(k1=24, k2=6, stage2_layer=5), Nuwa(k1=24, k2=6, reroute=True)):
        allowed = r"allowed decision layers are \[2, 4, 6\]"
        with pytest.raises(ValueError, match=allowed) as info, method(model):
            pass
        assert "\n" not in str(info.value)
