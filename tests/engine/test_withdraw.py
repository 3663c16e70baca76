"""VTW's terminal stage (arXiv 2405.05803) as ``withdraw_at=K`` on any method: from layer K on no
visual token runs, in prune and reroute alike; priced by the torch-free budget arithmetic."""

from __future__ import annotations

import pytest
import torch
from conftest import small_inputs, small_model_for
from reference import routed_reference

from vlm_reroute import kv_lengths, method_from_spec
from vlm_reroute.budget import ModelShape
from vlm_reroute.budget.flops import avg_visual_tokens, compute_budget
from vlm_reroute.budget.schedule import Schedule
from vlm_reroute.budget.solver import solve_for_target, solve_schedule
from vlm_reroute.budget.target import BudgetTarget
from vlm_reroute.methods import DART, FastV, PDrop

DEPTH = 8
METHODS = {
    "fastv-prune": lambda: FastV(layer=2, keep=16, withdraw_at=5),
    "fastv-reroute": lambda: FastV(layers=[2, 4], keep=16, reroute=True, withdraw_at=5),
    "pdrop-prune": lambda: PDrop(layers=[1, 3], keep=[32, 16], withdraw_at=5),
    "pdrop-reroute": lambda: PDrop(layers=[1, 3], keep=[32, 16], reroute=True, withdraw_at=5),
}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_kv_lengths_are_text_only_from_k(name, family):
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=5)
    method = METHODS[name]()
    with method(model) as trace:
        cache = model(**inputs, use_cache=True).past_key_values
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - visual
    per_layer = method.resolve(ModelShape.from_config(model.config), visual).tokens_per_layer(DEPTH, visual)
    assert per_layer[5:] == [0, 0, 0] and per_layer[:5] != [0] * 5
    assert trace.tokens_per_layer(DEPTH) == per_layer
    assert kv_lengths(cache) == [n_text + v for v in per_layer]
    assert trace.decisions[-1].layer == 5 and trace.decisions[-1].kept == [0]


@pytest.mark.parametrize("name", METHODS)
def test_logits_and_decoding_equal_the_reference(name):
    """The reference runs the recorded decisions plus an empty one at K; greedy decoding equals the
    reference's argmax over prompt + generated tokens (each layer's cache: the stage's tokens)."""
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=3)
    method = METHODS[name]()
    with method(model) as trace:
        logits = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    layers = [d.layer for d in trace.decisions]
    selected = [d.selected[0] for d in trace.decisions]
    ref, _ = routed_reference(model, inputs, layers, selected, method.reroute)
    torch.testing.assert_close(logits, ref[-1], rtol=1e-5, atol=1e-5)
    new = generated[0, inputs["input_ids"].shape[1] :]
    ref, _ = routed_reference(model, inputs, layers, selected, method.reroute, extra_ids=new[:-1])
    assert ref[-new.numel() :].argmax(dim=-1).tolist() == new.tolist()


def test_prune_and_reroute_withdraw_alike():
    """After K nothing is ranked: both modes run the same (text-only) layers, and a reroute schedule
    whose decisions keep everything is the prune one, bit for bit."""
    model = small_model_for("qwen2_5_vl")
    inputs = small_inputs(model, (20, 9), seed=2)
    out = {}
    for reroute in (False, True):
        with PDrop(layers=[2, 4], keep=[1.0, 1.0], reroute=reroute, withdraw_at=6)(model) as trace:
            out[reroute] = model(**inputs, use_cache=True)
        assert [d.kept for d in trace.decisions][-1] == [0, 0]
    assert torch.equal(out[False].logits, out[True].logits)
    assert kv_lengths(out[False].past_key_values) == kv_lengths(out[True].past_key_values)


def test_dart_withdraws_too():
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=1)
    with DART(layers=[1, 3], keep=12, reroute=True, withdraw_at=6)(model) as trace:
        model(**inputs)
    assert trace.tokens_per_layer(DEPTH) == [64, 12, 12, 12, 12, 12, 0, 0]


def test_budget_prices_the_withdrawal():
    schedule = Schedule.of([2], [64], withdraw_at=15)
    assert schedule.tokens_per_layer(32, 576) == [576] * 2 + [64] * 13 + [0] * 17
    assert schedule.avg_t(32, 576) == (2 * 576 + 13 * 64) / 32
    assert avg_visual_tokens(32, 576, [2], [64], withdraw_at=15) == schedule.avg_t(32, 576)
    assert avg_visual_tokens(32, 576, [], [], withdraw_at=15) == 576 * 15 / 32  # VTW alone: 270
    shape = ModelShape.from_config(small_model_for("llava").config)
    budget = compute_budget(shape, 64, 30, [1, 3], [32, 16], withdraw_at=5)
    assert [r.visual_tokens for r in budget.rows] == [64, 32, 32, 16, 16, 0, 0, 0]
    assert budget.avg_t == (64 + 2 * 32 + 2 * 16) / 8 and budget.withdraw_at == 5
    plain = compute_budget(shape, 64, 30, [1, 3], [32, 16])
    assert budget.flops_pdrop < plain.flops_pdrop and budget.kv_bytes < plain.kv_bytes


def test_the_solver_hits_targets_with_a_withdrawal():
    plain = solve_schedule(32, 576, "pdrop", True, avg_t=64)
    solved = solve_schedule(32, 576, "pdrop", True, avg_t=64, withdraw_at=28)
    assert abs(solved.avg_t - 64) <= 0.5 and solved.withdraw_at == 28
    assert solved.schedule.avg_t(32, 576) == solved.avg_t
    assert solved.keep[0] > plain.keep[0]  # fewer layers carry tokens: each carries more
    method = solved.to_method()
    assert isinstance(method, PDrop) and method.withdraw_at == 28
    target = solve_for_target(32, 576, PDrop, False, BudgetTarget(avg_t=64), None, 0, 28)
    assert abs(target.avg_t - 64) <= 0.5 and target.withdraw_at == 28
    fast = method_from_spec("fastv", reroute=True, tier=16, withdraw_at=7)
    assert fast.withdraw_at == 7
    counts = fast.resolve(ModelShape.from_config(small_model_for("llava").config), 64)
    assert abs(counts.avg_t(DEPTH, 64) - 16) <= 0.5 and counts.tokens_per_layer(DEPTH, 64)[7] == 0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: FastV(layer=3, keep=8, withdraw_at=3),
            r"FastV\(withdraw_at=3\): the last decision layer is 3",
        ),
        (lambda: PDrop(layers=[2, 5], keep=[8, 4], withdraw_at=4), r"withdraw_at must be in 6\.\.L-1"),
        (lambda: Schedule.of([2], [8], withdraw_at=0), r"withdraw_at must be in 3\.\.L-1"),
        (lambda: Schedule.of([2], [8], withdraw_at=8).check_depth(8), r"this decoder has 8 layers.* 3\.\.7"),
        (lambda: avg_visual_tokens(8, 64, [2], [8], withdraw_at=9), r"withdraw_at must be in 3\.\.7"),
        (lambda: solve_schedule(8, 64, "fastv", avg_t=16, withdraw_at=1), r"withdraw_at=1"),
    ],
)
def test_bad_withdrawals_are_one_line_errors(build, message):
    with pytest.raises(ValueError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


def test_beyond_the_last_layer_is_refused_when_applied():
    model = small_model_for("llava")
    method = PDrop(target=BudgetTarget(avg_t=16), withdraw_at=8)  # default layers: known with the depth
    with pytest.raises(ValueError, match=r"PDrop\(withdraw_at=8\).*this decoder has 8 layers"), method(model):
        pass
    with pytest.raises(TypeError, match=r"withdraw_at=True"):
        FastV(withdraw_at=True)


def test_methods_without_it_are_unchanged():
    assert FastV().withdraw_at is None and FastV().schedule().withdraw_at is None
    assert Schedule.of([3], [8]).tokens_per_layer(8, 64) == [64] * 3 + [8] * 5
