"""Nüwa stage-1 signals from real (tiny) vision towers, checked against the towers' own eager attention.

The signals are read from a model running ``sdpa``; the references come from the same weights run
with ``attn_implementation="eager"`` (CLIP: ``output_attentions``; Qwen2.5-VL, whose vision blocks
drop their probabilities, by recording what its eager attention function returns). The window
order of Qwen2.5-VL is rebuilt with plain loops (nuwa.md §1.1, §3.1, §9).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen_module
from conftest import model_for
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from vlm_reroute.methods.nuwa.aggregate import llava_tau, qwen_tau, run_stage1
from vlm_reroute.methods.nuwa.select import qwen_anchor_count
from vlm_reroute.methods.nuwa.signals import (
    clip_signals,
    clip_similarity_layers,
    llava_signals,
    qwen_signals,
    qwen_similarity_blocks,
    qwen_vision_signals,
)
from vlm_reroute.testing.models import TextShape, _init_weights, tiny_inputs, tiny_model


def model(family: str, attn: str):
    return model_for(family, attn)  # the suite's cached tiny models


def clip_tower(depth: int, attn: str) -> CLIPVisionModel:
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=depth,
        num_attention_heads=2,
        image_size=112,
        patch_size=14,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(1)  # biases and norms keep their constructor init
    return _init_weights(CLIPVisionModel(cfg), 0.2, seed=1)


def qwen_tower(depth: int, full: list[int], attn: str) -> Qwen2_5_VisionTransformerPretrainedModel:
    cfg = Qwen2_5_VLVisionConfig(
        depth=depth,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=48,
        num_heads=2,
        patch_size=14,
        window_size=112,
        fullatt_block_indexes=full,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(2)
    return _init_weights(Qwen2_5_VisionTransformerPretrainedModel(cfg), 0.2, seed=2)


def qwen_pixels(grids: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    return torch.randn(int(thw.prod(dim=1).sum()), 3 * 2 * 14 * 14, generator=gen), thw


def window_order(grids: list[tuple[int, int]], side: int = 4) -> list[int]:
    """Global raster index of each merged token in Qwen2.5-VL's window order (windows of side² tokens)."""
    order, offset = [], 0
    for h, w in grids:
        hm, wm = h // 2, w // 2
        for wy in range(math.ceil(hm / side)):
            for wx in range(math.ceil(wm / side)):
                for y in range(wy * side, min(wy * side + side, hm)):
                    for x in range(wx * side, min(wx * side + side, wm)):
                        order.append(offset + y * wm + x)
        offset += hm * wm
    return order


def to_raster(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    out = torch.empty_like(values)
    for i, r in enumerate(order):
        out[r] = values[i]
    return out


@contextmanager
def record_eager(attn_module):
    """Yield the list of attention probabilities ``attn_module`` computes, one per eager call."""
    seen, original = [], qwen_module.eager_attention_forward

    def spy(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        if module is attn_module:
            seen.append(out[1])
        return out

    qwen_module.eager_attention_forward = spy
    try:
        yield seen
    finally:
        qwen_module.eager_attention_forward = original


def eager_received(visual, pixels, thw) -> torch.Tensor:
    """Received attention per merged token from the tower's own eager probabilities, in window order."""
    with record_eager(visual.blocks[-1].attn) as seen:
        visual(pixels, grid_thw=thw)
    per_patch = torch.cat([p[0].mean(dim=0).sum(dim=0) for p in seen])  # release: head mean, query sum
    return per_patch.view(-1, 4).mean(dim=-1)


# ---------------------------------------------------------------- LLaVA / CLIP


def test_similarity_layer_rules():
    assert clip_similarity_layers(24) == range(16, 25)  # hs[16..24], nuwa.md §1.1
    assert clip_similarity_layers(2) == range(1, 3)
    assert qwen_similarity_blocks(32) == range(7, 24)  # blocks 7..23, nuwa.md §3.1
    assert qwen_similarity_blocks(2) == range(0, 2)
    assert qwen_similarity_blocks(4) == range(1, 4)


def test_llava_signals_match_the_towers_eager_attention():
    fast, eager = model("llava", "sdpa"), model("llava", "eager")
    pixels = tiny_inputs(fast, text_lengths=(3, 4))["pixel_values"]  # two 336² images: 24×24 grids
    sig = llava_signals(fast, pixels)
    ref = eager.model.vision_tower(pixels, output_attentions=True)
    own = fast.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    cls_row = ref.attentions[-2][:, :, 0, 1:].sum(dim=1)  # block 1 of 2 = LLaVA's hs[-2] block
    assert [tuple(s.shape) for s in sig.salience] == [(24, 24), (24, 24)]
    assert torch.allclose(torch.stack(sig.salience).flatten(1), cls_row, atol=1e-6)
    assert torch.equal(torch.stack(sig.features), own[-2][:, 1:])
    assert torch.allclose(torch.stack(sig.similarity), torch.stack(own[1:3]).mean(dim=0)[:, 1:], atol=1e-6)


@pytest.mark.parametrize(("feature_layer", "block"), [(-2, 2), (-4, 0), (2, 1), (4, 3)])
def test_clip_feature_layer_picks_its_own_block(feature_layer, block):
    fast, eager = clip_tower(4, "sdpa"), clip_tower(4, "eager")
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    sig = clip_signals(fast, pixels, feature_layer=feature_layer, similarity_layers=[2, 4, 4])
    ref = eager(pixels, output_attentions=True)
    own = fast(pixels, output_hidden_states=True).hidden_states
    assert torch.allclose(
        torch.stack(sig.salience).flatten(1), ref.attentions[block][:, :, 0, 1:].sum(1), atol=1e-6
    )
    assert torch.equal(torch.stack(sig.features), own[feature_layer][:, 1:])
    weighted = (own[2] + 2 * own[4]) / 3  # a repeated index counts twice
    assert torch.allclose(torch.stack(sig.similarity), weighted[:, 1:], atol=1e-6)
    default = clip_signals(fast, pixels)  # depth 4: hs[3..4]
    assert torch.allclose(torch.stack(default.similarity), torch.stack(own[3:5]).mean(0)[:, 1:], atol=1e-6)


def test_signals_leave_no_hooks_behind():
    tower = clip_tower(2, "sdpa")
    clip_signals(tower, torch.randn(1, 3, 112, 112))
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in tower.encoder.layers)


def test_llava_stage1_end_to_end_release_settings():
    """Budget 64 (nuwa.md §5): 112 anchors, ≤ 1 per cell, 50 kept bit for bit, the rest aggregated."""
    fast = model("llava", "sdpa")
    pixels = tiny_inputs(fast, text_lengths=(3, 4))["pixel_values"]
    sig = llava_signals(fast, pixels)
    own = fast.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    fixed = run_stage1(sig.features, sig.similarity, sig.salience, 1, 112, llava_tau(), 0.55, "convex")
    release = run_stage1(
        sig.features, sig.similarity, sig.salience, 1, 112, llava_tau(), 0.55, "release_llava"
    )
    for b, (mine, theirs) in enumerate(zip(fixed, release, strict=True)):
        cells = (mine.anchors // 24 // 2) * 12 + (mine.anchors % 24) // 2
        assert len(mine.anchors) == 112 and int(torch.bincount(cells).max()) == 1
        assert int((~mine.aggregated).sum()) == 50
        high = ~mine.aggregated
        assert torch.equal(mine.features[high], own[b, mine.anchors[high]])
        assert torch.equal(theirs.features[high], mine.features[high])
        assert torch.equal(theirs.anchors, mine.anchors)
        assert not torch.allclose(theirs.features[~high], mine.features[~high])


def test_llava_signals_errors():
    fast = tiny_model("llava", image_size=56)
    pixels = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError, match="feature_layer=0"):
        llava_signals(fast, pixels, feature_layer=0)
    with pytest.raises(ValueError, match="feature_layer=-3"):
        llava_signals(fast, pixels, feature_layer=-3)
    with pytest.raises(ValueError, match=r"similarity_layers=\[0\]"):
        llava_signals(fast, pixels, similarity_layers=[0])
    fast.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        llava_signals(fast, pixels)
    fast.config.vision_feature_select_strategy = "default"
    fast.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match=r"vision_feature_layer=\[-2, -1\]"):
        llava_signals(fast, pixels)


# ---------------------------------------------------------------- Qwen2.5-VL

GRIDS = [(16, 16), (12, 20)]  # merged 8×8 and 6×10: several 4×4 windows, some partial


def test_qwen_salience_matches_the_towers_eager_attention():
    fast, eager = model("qwen2_5_vl", "sdpa"), model("qwen2_5_vl", "eager")
    pixels, thw = qwen_pixels(GRIDS)
    sig = qwen_signals(fast, pixels, thw)
    expected = to_raster(eager_received(eager.model.visual, pixels, thw), window_order(GRIDS))
    assert [tuple(s.shape) for s in sig.salience] == [(8, 8), (6, 10)]
    assert torch.allclose(torch.cat([s.flatten() for s in sig.salience]), expected, atol=1e-5)


def test_qwen_features_are_the_models_image_embeddings():
    fast = model("qwen2_5_vl", "sdpa")
    pixels, thw = qwen_pixels(GRIDS)
    sig = qwen_signals(fast, pixels, thw)
    own = fast.model.get_image_features(pixels, thw).pooler_output
    assert all(torch.equal(a, b) for a, b in zip(sig.features, own, strict=True))


@pytest.mark.parametrize("max_elements", [1 << 25, 50])
def test_qwen_windowed_last_block_and_query_chunks(max_elements):
    """A last block with window attention: segments are windows; tiny chunks change nothing."""
    fast, eager = qwen_tower(3, [0], "sdpa"), qwen_tower(3, [0], "eager")
    pixels, thw = qwen_pixels(GRIDS, seed=1)
    sig = qwen_vision_signals(fast, pixels, thw, max_elements=max_elements)
    expected = to_raster(eager_received(eager, pixels, thw), window_order(GRIDS))
    assert torch.allclose(torch.cat([s.flatten() for s in sig.salience]), expected, atol=1e-5)


@pytest.mark.parametrize("official", [False, True])
def test_qwen_similarity_order(official):
    """Fixed: mean of blocks 1..3 through the merger in raster order; official: left in window order."""
    tower = qwen_tower(4, [1, 3], "sdpa")
    pixels, thw = qwen_pixels(GRIDS, seed=2)
    sig = qwen_vision_signals(tower, pixels, thw, official=official)
    hs = tower(pixels, grid_thw=thw, output_hidden_states=True).hidden_states  # hs[i + 1]: block i out
    merged = tower.merger(torch.stack(hs[2:5]).mean(dim=0))  # qwen_similarity_blocks(4) = 1..3
    expected = merged if official else to_raster(merged, window_order(GRIDS))
    assert torch.allclose(torch.cat(sig.similarity), expected, atol=1e-5)


def test_qwen_official_order_only_matters_beyond_one_window():
    tower = qwen_tower(2, [1], "sdpa")
    for grids, same in (([(8, 8)], True), ([(8, 12)], False)):  # 4×4 merged = one window; 4×6 = two
        pixels, thw = qwen_pixels(grids)
        fixed = qwen_vision_signals(tower, pixels, thw)
        official = qwen_vision_signals(tower, pixels, thw, official=True)
        assert torch.equal(fixed.similarity[0], official.similarity[0]) is same
        assert torch.equal(fixed.salience[0], official.salience[0])


def test_qwen_stage1_padding_example_end_to_end():
    """nuwa.md §9: a 23×17 merged grid at ratio 0.5 gives 235 anchors, all on the real grid."""
    fast = model("qwen2_5_vl", "sdpa")
    pixels, thw = qwen_pixels([(46, 34), (16, 16)], seed=3)
    sig = qwen_signals(fast, pixels, thw)
    grids = [tuple(s.shape) for s in sig.salience]
    k1 = [qwen_anchor_count(*g, 0.6, 3) for g in grids]
    out = run_stage1(sig.features, sig.similarity, sig.salience, 3, k1, [qwen_tau(*g) for g in grids], 0.1)
    assert grids == [(23, 17), (8, 8)] and k1 == [235, 39]
    assert [len(r.anchors) for r in out] == [235, 39]
    assert int(out[0].anchors.max()) < 391
    for r, feats in zip(out, sig.features, strict=True):
        high = ~r.aggregated
        assert torch.equal(r.features[high], feats[r.anchors[high]])
        assert 0 < int(r.aggregated.sum()) <= math.ceil(0.1 * len(r.anchors))


def test_qwen_signals_errors():
    fast = model("qwen2_5_vl", "sdpa")
    pixels, thw = qwen_pixels([(8, 8)])
    with pytest.raises(ValueError, match=r"similarity_blocks=\[2\]"):
        qwen_signals(fast, pixels, thw, similarity_blocks=[2])
    with pytest.raises(ValueError, match=r"grid_thw=\[\[2, 8, 8\]\]"):
        qwen_signals(fast, torch.cat([pixels, pixels]), torch.tensor([[2, 8, 8]]))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration: Nüwa's Qwen stage 1 is defined for"):
        qwen_signals(model("llava", "sdpa"), pixels, thw)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_half_precision_towers_give_the_same_anchors_signals(family):
    """bf16 towers: salience and similarity come out in float32, close to the float32 tower's."""
    half = model_for(family, "sdpa", torch.bfloat16)
    shape = TextShape(layers=4, hidden=32, heads=2, ffn=64)  # model_for's half-precision shape
    if family == "llava":
        full = tiny_model(family, shape=shape, image_size=112)
        pixels = tiny_inputs(full)["pixel_values"]  # one 112² image: an 8×8 grid
        sig, ref = llava_signals(half, pixels), llava_signals(full, pixels)
    else:
        pixels, thw = qwen_pixels(GRIDS)
        sig, ref = qwen_signals(half, pixels, thw), qwen_signals(tiny_model(family, shape=shape), pixels, thw)
    assert sig.features[0].dtype == torch.bfloat16 and sig.salience[0].dtype == torch.float32
    for a, b in zip(sig.salience + sig.similarity, ref.salience + ref.similarity, strict=True):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))
