"""One shape for every method: the registry and factory, per-prompt budgets, scorers, layouts."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import merge_samples, model_for, small_inputs, small_model_for, split_sample

from vlm_reroute import (
    BudgetTarget,
    FastV,
    LastTokenAttention,
    PDrop,
    Random,
    Schedule,
    method_from_spec,
    method_names,
)
from vlm_reroute.budget import ModelShape, compute_budget
from vlm_reroute.budget.solver import UnreachableTargetWarning, solve_schedule
from vlm_reroute.testing.models import tiny_inputs

# ---- registry and factory ---------------------------------------------------------------------


def test_registry_lists_the_shipped_methods():
    assert {"fastv", "pdrop", "random"} <= set(method_names())


@pytest.mark.parametrize(
    ("spec", "kwargs", "cls", "name"),
    [
        ("fastv", {}, FastV, "FastV"),
        ("FastV + Reroute", {}, FastV, "FastV + Reroute"),
        ("pdrop", {"reroute": True}, PDrop, "PDrop + Reroute"),
        ("PDrop-Reroute", {}, PDrop, "PDrop + Reroute"),
        ("random", {"seed": 3}, Random, "Random"),
    ],
)
def test_method_from_spec_names(spec, kwargs, cls, name):
    method = method_from_spec(spec, tier=64, **kwargs)
    assert type(method) is cls and method.name == name


def test_method_from_spec_explicit_schedule():
    method = method_from_spec("pdrop", reroute=True, layers=[2, 7], keep=[46, 23])
    assert method == PDrop(layers=[2, 7], keep=[46, 23], reroute=True)
    fastv = method_from_spec("fastv", layers=[3], keep=[64])
    assert fastv == FastV(layer=3, keep=64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tier": 64, "keep": [3]}, r"tier=64 with keep=\[3\]: give a budget .* or explicit keep counts"),
        ({"keep": [3]}, r"keep=\[3\] without layers"),
        ({"layers": [3]}, r"layers=\[3\] without keep or a budget"),
        ({"tier": 64, "ratio": 0.1}, r"give one budget, not several"),
        ({"ratio": 1.5}, r"BudgetTarget\(ratio=1.5\): a fraction must be in \(0, 1\]"),
    ],
)
def test_method_from_spec_refuses_mixed_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        method_from_spec("pdrop", **kwargs)


def test_unknown_method_lists_the_registry():
    with pytest.raises(ValueError, match=r"unknown method 'nosuchmethod'; allowed: fastv, pdrop, random"):
        method_from_spec("nosuchmethod", tier=64)


def test_method_from_spec_checks_the_model_early():
    model = small_model_for("llava")
    with pytest.raises(ValueError, match=r"layer 9 is out of range.*decision layers must be in 1\.\.7"):
        method_from_spec("pdrop", layers=[2, 9], keep=[8, 4], model=model)


# ---- one Schedule, one set of rules -----------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: PDrop(layers=[0, 2], keep=[8, 4]),
        lambda: FastV(layer=0, keep=8),
        lambda: Schedule.of([0], [8]),
        lambda: compute_budget(_SHAPE, 576, 0, [0], [8]),
        lambda: solve_schedule(32, 576, "pdrop", layers=[0, 7], avg_t=64),
    ],
)
def test_layer_zero_is_refused_everywhere_with_one_message(build):
    with pytest.raises(ValueError, match=r"layer 0 is out of range; decision layers start at 1"):
        build()


_SHAPE = ModelShape("t", 32, 4096, 11008, 32, 32, 128)


def test_settings_are_immutable_and_replace_revalidates():
    method = PDrop(layers=[1, 3], keep=[8, 4])
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.keep = [0, 0]
    with pytest.raises(ValueError, match=r"a token count must be ≥ 1"):
        method.replace(keep=[0, 0])
    assert method.replace(reroute=True).reroute is True
    assert method.keep == (8, 4)  # stored as a tuple: nothing to mutate in place


# ---- per-prompt budgets ---------------------------------------------------------------------


def test_a_tier_is_solved_per_image_size():
    """Qwen images of different sizes in one batch each get the schedule solved for their size."""
    model = model_for("qwen2_5_vl")
    small = tiny_inputs(model, (10,), grid=16, seed=1)  # 64 tokens
    large = tiny_inputs(model, (10,), grid=24, seed=2)  # 144 tokens
    batch = merge_samples(model, large, small)
    method = method_from_spec("pdrop", reroute=True, tier=20)
    with method(model) as trace:
        model(**batch)
    shape = ModelShape.from_config(model.config)
    for b, n in ((0, 144), (1, 64)):
        expected = solve_schedule(shape, n, "pdrop", True, avg_t=20)
        assert [d.kept[b] for d in trace.decisions] == list(expected.keep)
        assert [d.layer for d in trace.decisions] == list(expected.layers)
    with method(model) as alone:
        model(**split_sample(batch, 1))
    assert [d.kept[0] for d in alone.decisions] == [d.kept[1] for d in trace.decisions]


def test_a_ratio_keeps_the_same_fraction_of_every_image():
    model = model_for("qwen2_5_vl")
    method = method_from_spec("fastv", reroute=True, ratio=0.25)
    for grid, n in ((16, 64), (24, 144)):
        with method(model) as trace:
            model(**tiny_inputs(model, (10,), grid=grid))
        avg = sum(trace.tokens_per_layer(8)) / 8
        assert abs(avg - 0.25 * n) <= 0.5


def test_unreachable_target_is_clamped_with_a_warning_or_refused_when_strict():
    model = small_model_for("llava")
    inputs = small_inputs(model, (10,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with method_from_spec("fastv", tier=2)(model) as trace:
            model(**inputs)
    assert any(issubclass(w.category, UnreachableTargetWarning) for w in caught)
    assert "using avg_T=" in str(next(w.message for w in caught))
    assert trace.decisions[0].kept == [1]  # the nearest reachable schedule: keep one token
    with (
        pytest.raises(ValueError, match=r"target avg_T=2 is not reachable"),
        method_from_spec("fastv", tier=2, strict=True)(model),
    ):
        model(**inputs)


def test_budget_target_needs_exactly_one_value():
    with pytest.raises(ValueError, match="give exactly one"):
        BudgetTarget()
    with pytest.raises(ValueError, match="give exactly one"):
        BudgetTarget(avg_t=64, ratio=0.1)


# ---- the Random baseline ------------------------------------------------------------------


@pytest.mark.parametrize("reroute", [False, True])
def test_random_is_seeded_batch_invariant_and_differs_by_seed(reroute):
    model = small_model_for("qwen2_vl")
    inputs = small_inputs(model, (20, 7), seed=4)
    keep = [32, 32, 16] if reroute else [48, 32, 16]

    def decide(seed: int, batch: dict) -> list[list[torch.Tensor]]:
        with Random(layers=[1, 3, 5], keep=keep, reroute=reroute, seed=seed)(model) as trace:
            model(**batch)
        return [d.selected for d in trace.decisions]

    first, again, other = decide(0, inputs), decide(0, inputs), decide(1, inputs)
    assert all(
        torch.equal(a, b) for x, y in zip(first, again, strict=True) for a, b in zip(x, y, strict=True)
    )
    assert any(
        not torch.equal(a, b) for x, y in zip(first, other, strict=True) for a, b in zip(x, y, strict=True)
    )
    assert not torch.equal(first[0][0], first[0][1])  # two samples draw their own scores
    for b in range(2):
        alone = decide(0, split_sample(inputs, b))
        assert all(torch.equal(d[b], a[0]) for d, a in zip(first, alone, strict=True))


def test_random_reroute_readmits_tokens():
    model = small_model_for("llava")
    with Random(layers=[1, 3, 5], keep=[16, 16, 8], reroute=True, seed=0)(model) as trace:
        model(**small_inputs(model, (10,)))
    assert sum(d.reentered[0] for d in trace.decisions[1:]) > 0


# ---- the attention scorer -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize(("rows", "heads"), [(1, "mean"), (3, "max"), (2, "mean")])
def test_last_rows_scorer_equals_the_models_eager_attention(family, rows, heads):
    """Nüwa's stage-2 rule (rows=3, heads='max') and today's (rows=1, 'mean') are both the model's
    own attention probabilities, reduced the same way."""
    model = model_for(family, attn="eager")
    inputs = tiny_inputs(model, (20,), seed=1)
    layer = 3
    probs = model(**inputs, output_attentions=True).attentions[layer][0, :, -rows:]  # (H, rows, N)
    row = probs.mean(dim=1)
    expected = row.mean(0) if heads == "mean" else row.amax(0)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    scorer = LastTokenAttention(rows=rows, heads=heads)
    with PDrop(layers=[layer], keep=[64], scorer=scorer)(model) as trace:
        model(**inputs)
    torch.testing.assert_close(trace.decisions[0].scores[0], expected[visual], rtol=1e-5, atol=1e-7)


def test_scorer_settings_are_checked():
    with pytest.raises(ValueError, match=r"heads='median'\): allowed are 'mean' and 'max'"):
        LastTokenAttention(heads="median")
    with pytest.raises(ValueError, match=r"rows=0\)"):
        LastTokenAttention(rows=0)


# ---- image layouts ------------------------------------------------------------------------


def test_llava_layout_is_one_square_grid_per_image():
    model = model_for("llava")
    inputs = tiny_inputs(model, (20, 9), images_per_prompt=2)
    with FastV(layer=2, keep=16)(model) as trace:
        model(**inputs)
    assert [[(lay.image, lay.offset, lay.length, lay.grid) for lay in s] for s in trace.layouts] == [
        [(0, 0, 576, (24, 24)), (1, 576, 576, (24, 24))]
    ] * 2
    ids = inputs["input_ids"]
    for sample in trace.layouts:
        for lay in sample:
            start, end = lay.span
            assert bool((ids[lay.sample, start:end] == model.config.image_token_id).all())


def test_qwen_layout_is_the_same_from_a_forward_and_from_generate():
    model = model_for("qwen2_vl")
    small = tiny_inputs(model, (10,), grid=16, seed=1)
    large = tiny_inputs(model, (10,), grid=24, seed=2)
    batch = merge_samples(model, large, small)
    method = FastV(layer=2, keep=8)
    with method(model) as trace:
        model(**batch)
    forward = trace.layouts
    with method(model) as trace:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert trace.layouts == forward
    assert [s[0].grid for s in forward] == [(12, 12), (8, 8)]
    cells = forward[1][0].token_cells()
    assert cells[:, 0].eq(0).all() and torch.equal(cells[:, 1], torch.arange(64))


def test_llava_refuses_multi_crop_pixel_values():
    model = small_model_for("llava")
    inputs = small_inputs(model, (10,))
    crops = dict(inputs, pixel_values=inputs["pixel_values"][:, None])
    with (
        pytest.raises(ValueError, match=r"pixel_values of shape \(1, 1, 3, 112, 112\).*belong to LLaVA-NeXT"),
        FastV(layer=2, keep=8)(model),
    ):
        model(**crops)
