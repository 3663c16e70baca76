"""Nüwa (arXiv 2602.02951) on the multi-view families: LLaVA-NeXT / OneVision (``nuwa.md`` §4: the base
view on its own grid, the stitched un-padded crops jointly, K₁ split per crop) and InternVL, Idefics3,
SmolVLM (this library's extension: each view on its own grid, K₁ in proportion to the views' cells).

Signals are read here from the untouched towers (eager copies / float64 by hand, the pixel shuffle
written out, packed rows matched to the crop patch they came from); the rule is ``nuwa_reference``'s
(written from ``nuwa.md``); logits are its hand-driven decoder's.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_inputs, small_model_for
from nuwa_reference import nuwa_reference
from nuwa_views_reference import multi_view_stage1, split_k1
from stage1_support import generate_matches_forward
from visionzip_reference import eager_anyres_pass, internvl_reference_signals, shuffle_reference_signals

from vlm_reroute import Nuwa


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def similarity_layers(depth: int, clip: bool) -> list[int]:
    """Hidden-state indices averaged (docs: the releases' layers as fractions of the depth): the LLaVA
    release's ``hs[16..24]`` of 24, the merger release's blocks ``7..23`` of 32 (``hs`` = block + 1)."""
    if clip:
        return list(range(_half_up(16 / 24 * depth), depth + 1))
    last = min(_half_up(23 / 32 * depth), depth - 1)
    return [b + 1 for b in range(_half_up(7 / 32 * depth), last + 1)]


def anyres_signals(model, inputs):
    """LLaVA-NeXT / OneVision, one image: packed rows, salience, similarity, newline indices, views and
    the crops the tower encoded. Each packed row is matched to the crop patch whose projected row it is."""
    inner, cfg = model.model, model.config
    tower, packed, out, cls, index = eager_anyres_pass(model, inputs)
    crops = inputs["pixel_values"][0]
    with torch.no_grad():
        depth = len(out.attentions)
        probs = out.attentions[index]
        salience = probs[:, :, 0, 1:].sum(dim=1) if cls else probs.sum(dim=(1, 2))
        hs = out.hidden_states
        mean = torch.stack([hs[i].double() for i in similarity_layers(depth, True)]).mean(0)[:, int(cls) :]
        rows = inner.multi_modal_projector(hs[cfg.vision_feature_layer][:, int(cls) :])
    newline = (packed == inner.image_newline).all(dim=-1)
    nearest = torch.cdist(packed.double(), rows.flatten(0, 1).double()).min(dim=1)
    assert bool((nearest.values[~newline] < 1e-4).all())
    sal = torch.where(newline, 0.0, salience.flatten()[nearest.indices].double())
    sim = torch.where(newline[:, None], 0.0, mean.flatten(0, 1)[nearest.indices])
    lines = newline.nonzero().flatten()
    side = int(rows.shape[1] ** 0.5)
    grid = packed.shape[0] - side * side - lines.numel()
    views = [(side, side)] + ([(lines.numel(), grid // lines.numel())] if grid else [])
    return packed, sal, sim, lines, views, crops.shape[0]


def tile_similarity(model, family: str):
    """Per token of each view: the mean over its patches (the pixel shuffle written out) of the mean of
    the merger release's block outputs, read by hooks on the untouched tower."""
    inner = model.model
    layers = inner.vision_tower.encoder.layer if family == "internvl" else inner.vision_model.encoder.layers
    wanted = similarity_layers(len(layers), False)
    seen = {}
    handles = [layers[i - 1].register_forward_hook(_keep(seen, i)) for i in wanted]
    return seen, handles, wanted


def _keep(seen, index):
    def hook(_module, _args, output):
        seen[index] = (output[0] if isinstance(output, tuple) else output).double()

    return hook


def shuffled(values: torch.Tensor, scale: int) -> torch.Tensor:
    """``(V, P, c)`` patches → ``(V·T, c)`` tokens, token ``(a, b)`` the mean of patches
    ``(a·s + i, b·s + j)``."""
    side = int(values.shape[1] ** 0.5)
    out = []
    for v in range(values.shape[0]):
        for a in range(side // scale):
            for b in range(side // scale):
                held = [(a * scale + i) * side + b * scale + j for i in range(scale) for j in range(scale)]
                out.append(values[v, held].mean(dim=0))
    return torch.stack(out)


def tile_signals(model, family, inputs):
    seen, handles, wanted = tile_similarity(model, family)
    try:
        if family == "internvl":
            rows, salience, _ = internvl_reference_signals(model, inputs)
            scale, drop = 2, 1
        else:
            rows, salience, _ = shuffle_reference_signals(model, inputs)
            scale, drop = model.config.scale_factor, 0
    finally:
        for handle in handles:
            handle.remove()
    mean = torch.stack([seen[i] for i in wanted]).mean(0)[:, drop:]
    if family != "internvl":  # Idefics3 drops all-padding images before the tower: same views here
        mean = mean[: rows.shape[0] // (mean.shape[1] // scale**2)]
    similarity = shuffled(mean, scale)
    side = int((mean.shape[1] // scale**2) ** 0.5)
    views = [(side, side)] * (rows.shape[0] // side**2)
    return rows, salience, similarity, views


def check(model, inputs, method, kept, rewritten, stage2_k, scorer):
    with method(model) as trace:
        logits = model(**inputs).logits[0]
    record = trace.stage1[0][0]
    assert record.anchors.tolist() == kept.tolist()
    assert trace.decisions[0].selected[0].tolist() == kept.tolist()
    stage2 = trace.decisions[1:]
    assert [d.kept for d in stage2] == [[stage2_k]]
    selected = [d.selected[0] for d in stage2]
    ref, scores = nuwa_reference(model, inputs, [rewritten], [kept], [4], selected, False, **scorer)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stage2[0].scores[0][kept], scores[0][kept], rtol=1e-4, atol=1e-6)
    best = kept[scores[0][kept].argsort(descending=True, stable=True)[:stage2_k]].sort().values
    assert torch.equal(selected[0], best)
    return record


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("k1", [13, 20, 31])
def test_anyres_matches_the_reference(family, k1):
    """§4: the base view gets K₁ // crops on its 4×4 grid, the stitched 8×4 crop grid the rest; each view
    selects and aggregates on its own grid; newline tokens are never anchors."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    packed, salience, similarity, lines, views, crops = anyres_signals(model, inputs)
    kept, rewritten = multi_view_stage1(packed, salience, similarity, views, lines, k1, crops, True, True)
    method = Nuwa(k1=k1, k2=4, stage2_layer=4)
    record = check(model, inputs, method, kept, rewritten, 4, {"rows": 1, "heads": "mean"})  # LLaVA's
    assert record.views == ((4, 4), (8, 4)) and lines.numel() == 8
    assert record.shares == tuple(split_k1(k1, [16, 32], crops, True)) and sum(record.shares) == k1
    assert record.shares[0] == k1 // crops  # the release's per-crop share for the base view
    assert not set(record.anchors.tolist()) & set(lines.tolist())
    assert any(bool(v.aggregated.any()) for v in record.per_view if v is not None)  # something absorbed


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "internvl"])
@pytest.mark.parametrize("k1", [10, 21])
def test_tiles_match_the_reference(family, k1):
    """Tiles + whole-image view: each 4×4 view on its own grid, K₁ in proportion (equal views: ⌊K₁/4⌋
    each, the leftover to the first views); the merger release's constants."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    rows, salience, similarity, views = tile_signals(model, family, inputs)
    none = torch.zeros(0, dtype=torch.long)
    kept, rewritten = multi_view_stage1(rows, salience, similarity, views, none, k1, len(views), False, False)
    method = Nuwa(k1=k1, k2=3, stage2_layer=4)
    record = check(model, inputs, method, kept, rewritten, 3, {"rows": 3, "heads": "max"})  # the merger's
    assert record.views == ((4, 4),) * 4 and sum(record.shares) == k1
    assert list(record.shares) == [k1 // 4 + (v < k1 % 4) for v in range(4)]


@pytest.mark.parametrize("family", ["llava_next", "smolvlm"])
def test_official_uses_the_release_weighting(family):
    """``official=True``: LLaVA-NeXT aggregates with the LLaVA release's non-convex rows (§1.4 step 4),
    SmolVLM with the Qwen release's computed self weight (§3.1); the anchors do not change."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    anyres = family == "llava_next"
    if anyres:
        packed, salience, similarity, lines, views, crops = anyres_signals(model, inputs)
    else:
        packed, salience, similarity, views = tile_signals(model, family, inputs)
        lines, crops = torch.zeros(0, dtype=torch.long), len(views)
    weighting = "release_llava" if anyres else "release_qwen"
    kept, rewritten = multi_view_stage1(
        packed, salience, similarity, views, lines, 20, crops, anyres, anyres, weighting=weighting
    )
    _, convex = multi_view_stage1(packed, salience, similarity, views, lines, 20, crops, anyres, anyres)
    assert not torch.allclose(rewritten, convex)  # the weighting matters here
    scorer = {"rows": 1, "heads": "mean"} if anyres else {"rows": 3, "heads": "max", "causal": False}
    method = Nuwa(k1=20, k2=4, stage2_layer=4, official=True)
    check(model, inputs, method, kept, rewritten, 4, scorer)


def test_split_rules():
    assert split_k1(31, [16, 32], 5, True) == [6, 25]  # 31 // 5 = 6 to the base view
    assert split_k1(31, [16, 32], 1, True) == [16, 15]  # a share above its view goes to the other
    assert split_k1(10, [16, 16, 16, 16], 4, False) == [3, 3, 2, 2]
    assert split_k1(7, [16, 48], 2, False) == [2, 5]  # 1.75 / 5.25: the larger remainder first


def test_newlines_enter_only_above_the_cells():
    """K₁ between the cells (48) and the tokens (56): every cell whole, then the first newlines."""
    model = small_model_for("llava_next")
    inputs = small_inputs(model, (20,), seed=3)
    with Nuwa(k1=50, k2=4, stage2_layer=4)(model) as trace:
        model(**inputs)
    record = trace.stage1[0][0]
    assert record.anchors.numel() == 50 and trace.decisions[0].kept == [50]
    assert [i for i in record.anchors.tolist() if i in record.newlines.tolist()] == [20, 25]
    assert record.per_view == (None, None)  # every cell entered unchanged


@pytest.mark.parametrize("family", ["llava_next", "internvl", "idefics3"])
def test_generate_continues_from_the_routed_prefill(family):
    """``generate()`` (InternVL / Idefics3 encode before the prefill; the prompt groups the views then):
    the first generated token's logits equal the routed forward's, with the same anchors, and decoding
    runs on (three tokens)."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20, 13), seed=5)
    out = generate_matches_forward(model, inputs, Nuwa(k1=12, k2=3, stage2_layer=4), 3)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", ["llava_next", "internvl", "idefics3", "smolvlm"])
def test_several_images_per_prompt(family):
    """Two prompts of images of different sizes: every image keeps K₁ of its own views, and each prompt
    decides alone as in the batch."""
    from conftest import split_sample

    from vlm_reroute.testing.family_inputs import tiny_family_inputs

    model = small_model_for(family)
    sizes = (((100, 300), (60, 60)), ((300, 100), (120, 90)))
    inputs = tiny_family_inputs(family, sizes=sizes, questions=("what is it", "and this"))
    method = Nuwa(k1=9, k2=3, stage2_layer=4)
    with method(model) as trace:
        batch = model(**inputs).logits[:, -1]
    records = [r for sample in trace.stage1 for r in sample]
    assert len(records) == 4 and all(r.anchors.numel() == 9 == sum(r.shares) for r in records)
    assert len({r.views for r in records}) > 1  # images of several layouts
    for b in range(2):
        with method(model):
            alone = model(**split_sample(inputs, b)).logits[0, -1]
        torch.testing.assert_close(batch[b], alone, rtol=1e-4, atol=1e-4)


def test_a_k1_above_the_image_is_refused_in_one_line():
    model = small_model_for("llava_next")
    inputs = small_inputs(model, (20,), seed=3)
    match = r"K₁ = 60 tokens per image, but this image has 56"
    with pytest.raises(ValueError, match=match) as info, Nuwa(k1=60, k2=4)(model):
        model(**inputs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_leaving_the_block_restores_the_model(family):
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    attributes = {name: dict(vars(m)) for name, m in model.named_modules()}
    with Nuwa(k1=12, k2=3, stage2_layer=4)(model):
        model(**inputs)
    after = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    assert after == hooks
    assert {name: dict(vars(m)) for name, m in model.named_modules()}.keys() == attributes.keys()
    assert all(vars(m).keys() == attributes[name].keys() for name, m in model.named_modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


@pytest.mark.parametrize(
    ("sizes", "views", "shares"),
    [
        # 36 crops + base, shrunk to 12×11: the base view gets 9 // 37 = 0, the crop grid all 9
        ((((336, 300),),), [((4, 4), (12, 11))], [(0, 9)]),
        ((((100, 300), (60, 60)),), [((4, 4),), ((4, 4),)], [(9,), (9,)]),  # base view + one newline
    ],
)
def test_onevision_shrunk_grids_and_base_only_images(sizes, views, shares):
    """OneVision's other packings: a crop grid shrunk bilinearly (12×11, its own rows' newlines) and
    base-only images (all of K₁ on the base grid); keep-all stays bit for bit, newlines never enter."""
    from vlm_reroute.testing.family_inputs import tiny_family_inputs

    model = small_model_for("llava_onevision")
    inputs = tiny_family_inputs("llava_onevision", sizes=sizes, questions=("what is it",))
    with torch.no_grad():
        vanilla = model(**inputs).logits
    with Nuwa(k1=1.0, k2=1.0)(model):
        assert torch.equal(model(**inputs).logits, vanilla)
    with Nuwa(k1=9, k2=3, stage2_layer=4)(model) as trace:
        model(**inputs)
    assert [r.views for r in trace.stage1[0]] == views
    for record, share in zip(trace.stage1[0], shares, strict=True):
        assert record.shares == share and record.anchors.numel() == 9
        assert not set(record.newlines.tolist()) & set(record.anchors.tolist())


def test_composition_and_targets_on_views():
    """``Nuwa + FastV`` keeps K₁ per image and FastV's count of them; a budget target is solved for
    the multi-view image's token count (its KV lengths are the resolved schedule's)."""
    from vlm_reroute import BudgetTarget, FastV, kv_lengths

    model = small_model_for("idefics3")
    inputs = small_inputs(model, (20,), seed=3)
    with (Nuwa(k1=12) + FastV(keep=5, layers=[3]))(model) as trace:
        model(**inputs)
    assert [d.layer for d in trace.decisions] == [0, 3] and [d.kept for d in trace.decisions] == [[12], [5]]
    method = Nuwa(target=BudgetTarget(avg_t=16))
    with method(model) as trace:
        cache = model(**inputs, use_cache=True).past_key_values
    n_text = inputs["input_ids"].shape[1] - 64
    assert kv_lengths(cache) == [n_text + v for v in trace.tokens_per_layer(8)]
    assert sum(trace.tokens_per_layer(8)) / 8 == pytest.approx(16, abs=1)
