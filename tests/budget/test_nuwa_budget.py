"""Nüwa in the budget arithmetic: the entry (stage 1) enters every layer before stage 2, the solver
reproduces the release, Nüwa + Reroute costs what Nüwa costs, and stage 1's vision-side MACs."""

from __future__ import annotations

import math

import pytest

from vlm_reroute import Nuwa, method_from_spec
from vlm_reroute.budget import compute_budget, load_shape
from vlm_reroute.budget.presets import preset, table
from vlm_reroute.budget.schedule import Schedule
from vlm_reroute.budget.solver import solve, tabulated_methods
from vlm_reroute.budget.stage1 import stage1_macs

RELEASE = {64: (112, 16), 128: (224, 32), 192: (336, 48)}  # nuwa.md §5


@pytest.mark.parametrize("tier", [64, 128, 192])
def test_solver_reproduces_the_llava_release(tier):
    k1, k2 = RELEASE[tier]
    prune, reroute = preset("llava-1.5-7b", tier, "nuwa"), preset("llava-1.5-7b", tier, "nuwa", True)
    assert (prune.layers, prune.keep) == ((0, 16), (k1, k2))
    assert (reroute.layers, reroute.keep) == ((0, 16, 20, 24, 28), (k1, k2, k2, k2, k2))
    assert prune.avg_t == reroute.avg_t == (16 * k1 + 16 * k2) / 32 == tier
    assert Nuwa(budget=tier).schedule().tokens_per_layer(32, 576) == [k1] * 16 + [k2] * 16


def test_reroute_has_the_prune_budget_and_scores_among_the_anchors():
    shape = load_shape("llava-1.5-7b")
    pair = solve(shape, 576, "nuwa", avg_t=64, n_text=40)
    prune, reroute = pair.prune.budget(shape, n_text=40), pair.reroute.budget(shape, n_text=40)
    assert [r.visual_tokens for r in prune.rows] == [r.visual_tokens for r in reroute.rows]
    assert (prune.kv_bytes, prune.flops_pdrop) == (reroute.kv_bytes, reroute.flops_pdrop)
    # decoder scoring: one query row and keys over text + the 112 anchors per decision (never 576)
    d, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    one = d * shape.num_heads * shape.head_dim + (40 + 112) * (d * kv + shape.num_heads * shape.head_dim)
    assert prune.flops_scoring == one and reroute.flops_scoring == 4 * one
    assert prune.rows[0].kv_tokens == 40 + 112 and prune.rows[16].kv_tokens == 40 + 16
    assert prune.kv_bytes == (16 * (40 + 112) + 16 * (40 + 16)) * 512 * 1024 // 32


@pytest.mark.parametrize(("ratio", "retention"), [(0.25, 0.256), (0.5, 0.505), (0.75, 0.73)])
def test_qwen_release_ratios_are_layer_averaged_retention(ratio, retention):
    """nuwa.md §3.3: s₁ on 15 layers, s₂ of the anchors on 13 averages to ≈ 0.256 / 0.505 / 0.73."""
    shape = load_shape("qwen2.5-vl-7b")
    schedule = Nuwa(ratio=ratio).resolve(shape, 576)
    s1, s2, _ = {0.25: (0.35, 0.42, 3), 0.5: (0.60, 0.66, 3), 0.75: (0.85, 0.70, 4)}[ratio]
    k1 = math.ceil(576 * s1)
    assert schedule.layers == (15,) and schedule.entry == k1 and schedule.keep == (int(k1 * s2),)
    assert schedule.avg_t(28, 576) / 576 == pytest.approx(retention, abs=0.005)


def test_schedule_entry_rules():
    entry = Schedule((16,), (0.25,), entry=0.35)
    assert entry.entry_count(391) == 137 and entry.counts(391) == (34,)  # ⌈0.35·391⌉; int(0.25·137)
    assert entry.budget_form(391) == ((0, 16), (137, 34))
    assert Schedule.from_budget_form((0, 16), (112, 16)) == Schedule((16,), (16,), entry=112)
    with pytest.raises(ValueError, match="cannot keep more tokens than enter the language model"):
        Schedule((16,), (200,), entry=112)
    with pytest.raises(ValueError, match="layer 0 is out of range"):  # a layer 0 alone is no entry
        Schedule.from_budget_form((0,), (112,))
    assert compute_budget(load_shape("llava-1.5-7b"), 576, 0, [0, 16], [112, 16]).avg_t == 64


def test_tables_and_registry_list_nuwa():
    names = tabulated_methods()  # after FastV and PDrop (the stage-1 methods VisionZip, DivPrune follow it)
    assert names.index("nuwa") > max(names.index("fastv"), names.index("pdrop"))
    rows = [r for r in table(models=("llava-1.5-7b",), tiers=(64,)) if r["method"].startswith("Nüwa")]
    assert [(r["method"], r["keep"]) for r in rows] == [
        ("Nüwa", [112, 16]),
        ("Nüwa + Reroute", [112, 16, 16, 16, 16]),
    ]
    solved = method_from_spec("nuwa", tier=64, reroute=True)
    assert solved.target is not None and solved.reroute
    explicit = method_from_spec("nuwa", layers=[16], keep=[16])
    assert (explicit.k1, explicit.k2, explicit.layers) == (1.0, 16, (16,))


def test_stage1_macs():
    llava, qwen = load_shape("llava-1.5-7b"), load_shape("qwen2.5-vl-7b")
    cost = stage1_macs(llava, "llava", 576, 112)
    d = 1024
    assert cost.low_anchors == 62  # ⌈0.55·111⌉: the 112 − 50 anchors below the gate (nuwa.md §1.4)
    assert cost.salience == 578 * d * d + 577 * d and cost.similarity == 0
    assert cost.aggregation == 62 * 576 * 2 * d + 576 * d
    q = stage1_macs(qwen, "qwen2_5_vl", 576, 202)
    assert q.low_anchors == math.ceil(0.1 * 201)
    assert q.salience == 3 * 2304 * 1280**2 + 2304**2 * 1280
    assert q.similarity == 576 * (5120 * 5120 + 5120 * 3584)
    assert stage1_macs(llava, "llava", 576, 576).aggregation == 0  # K₁ = every token: no stage 1
    with pytest.raises(ValueError, match="k1=600: anchors per image must be in 1..576"):
        stage1_macs(llava, "llava", 576, 600)
