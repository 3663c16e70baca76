"""Solver, published schedules and presets."""

from __future__ import annotations

import itertools
import runpy
from pathlib import Path

import pytest

from vlm_reroute.budget import load_shape
from vlm_reroute.budget.presets import PRESET_MODELS, TIERS, preset, table
from vlm_reroute.budget.solver import (
    PUBLISHED,
    default_layers,
    parse_method,
    published_avg_t,
    published_schedule,
    solve,
    solve_schedule,
    tabulated_methods,
)

N = 576


def avg_by_hand(num_layers: int, n: int, layers, keep) -> float:
    bounds = [*layers, num_layers]
    total = layers[0] * n + sum(k * (bounds[i + 1] - bounds[i]) for i, k in enumerate(keep))
    return total / num_layers


def check_schedule(s, target: float) -> None:
    assert abs(s.avg_t - target) <= 0.5, (s, target)
    assert s.avg_t == pytest.approx(avg_by_hand(s.num_layers, s.n_visual, s.layers, s.keep))
    assert all(isinstance(k, int) and 1 <= k <= s.n_visual for k in s.keep)
    assert all(b <= a for a, b in itertools.pairwise(s.keep)), s.keep
    if s.method == "fastv" and s.reroute:
        assert len(set(s.keep)) == 1
    if s.method == "fastv" and not s.reroute:
        assert len(s.layers) == 1


# ---- default layers -------------------------------------------------------------------------


def test_default_layers_32_and_28():
    assert default_layers("fastv", 32) == (3,)
    assert default_layers("fastv", 32, reroute=True) == (3, 7, 15, 23)
    assert default_layers("pdrop", 32) == default_layers("pdrop", 32, True) == (2, 7, 15, 23)
    assert default_layers("FastV + Reroute", 28) == (3, 6, 13, 20)
    assert default_layers("pdrop", 28) == default_layers("pdrop_reroute", 28) == (2, 6, 13, 20)
    assert default_layers("fastv", 28) == (3,)


@pytest.mark.parametrize("num_layers", range(5, 81))
def test_default_layers_valid_for_any_depth(num_layers):
    for method, reroute in itertools.product(("fastv", "pdrop"), (False, True)):
        layers = default_layers(method, num_layers, reroute)
        assert all(1 <= x <= num_layers - 1 for x in layers)
        assert all(b > a for a, b in itertools.pairwise(layers))


def test_default_layers_too_shallow_and_bad_method():
    with pytest.raises(ValueError, match="too shallow"):
        default_layers("pdrop", 4)
    with pytest.raises(ValueError, match="unknown method 'nosuchmethod'"):
        default_layers("nosuchmethod", 32)
    assert parse_method("PDrop-Reroute") == ("pdrop", True)


# ---- published schedules --------------------------------------------------------------------


def test_published_llava_fastv_and_pdrop_192_128_hit_their_labels():
    for entry in PUBLISHED:
        if entry.model != "llava-1.5":
            continue
        if entry.method == "fastv" or entry.tier in (192, 128):
            assert abs(published_avg_t(entry) - entry.tier) <= 1, entry


def test_published_llava_pdrop_avg64_schedules_average_81_and_84():
    prune = published_schedule("llava-1.5", 64, "pdrop")
    reroute = published_schedule("llava-1.5", 64, "pdrop", reroute=True)
    # By hand: int(576·f) = [160, 53, 18, 6] and [80, 80, 40, 20] on layers [2, 7, 15, 23] of 32.
    assert prune.keep == (160, 53, 18, 6) and reroute.keep == (80, 80, 40, 20)
    assert prune.avg_t == pytest.approx((2 * 576 + 5 * 160 + 8 * 53 + 8 * 18 + 9 * 6) / 32)
    assert reroute.avg_t == pytest.approx((2 * 576 + 5 * 80 + 8 * 80 + 8 * 40 + 9 * 20) / 32)
    assert abs(prune.avg_t - 81) <= 1
    assert abs(reroute.avg_t - 84) <= 1


def test_published_qwen_schedules_miss_their_labels():
    qwen = [e for e in PUBLISHED if e.model == "qwen2.5-vl-7b"]
    assert len(qwen) == 12 and all(e.num_layers == 28 for e in qwen)
    misses = [abs(e.avg_t - e.tier) for e in qwen]
    assert sum(m > 1 for m in misses) >= 9
    # FastV at layer 3 of 28 with k = int(576·0.2644) = 152: (3·576 + 25·152) / 28
    fastv = published_schedule("qwen2.5-vl-7b", 192, "fastv")
    assert fastv.avg_t == pytest.approx((3 * 576 + 25 * 152) / 28)


def test_published_lookup_error():
    with pytest.raises(ValueError, match="no published schedule"):
        published_schedule("llava-1.5", 100, "fastv")


# ---- solver ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [28, 32, 36, 40])
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_solver_hits_targets(num_layers, method):
    pair0 = solve(num_layers, N, method, avg_t=300)
    for s in (pair0.prune, pair0.reroute):
        l0 = s.layers[0]
        lo = (l0 * N + (num_layers - l0)) / num_layers
        hi = (
            N
            if not (method == "pdrop" and s.reroute)
            else avg_by_hand(num_layers, N, s.layers, [N, N, N / 2, N / 4])
        )
        for target in [lo + 0.5, *range(int(lo) + 1, int(hi), 11), hi - 0.5, 64, 128, 192]:
            check_schedule(solve_schedule(num_layers, N, method, s.reroute, avg_t=target), target)


def test_solver_fractional_targets_and_other_image_sizes():
    for n, target in [(256, 40.3), (1024, 333.3), (64, 20.7), (10, 5.2)]:
        pair = solve(32, n, "pdrop", avg_t=target)
        check_schedule(pair.prune, target)
        check_schedule(pair.reroute, target)


def test_solved_pdrop_follows_the_published_rule():
    # The published PDrop 192/128 fractions are n·ρ^(i+1) and the + Reroute ones [a, a, a/2, a/4]:
    # the solver's counts must land within one token of the published counts int(576·f).
    for tier in (192, 128):
        for reroute in (False, True):
            solved = solve_schedule(32, N, "pdrop", reroute, avg_t=tier)
            published = published_schedule("llava-1.5", tier, "pdrop", reroute)
            assert solved.layers == published.layers
            assert all(abs(a - b) <= 1 for a, b in zip(solved.keep, published.keep, strict=True)), (
                solved.keep,
                published.keep,
            )


def test_fastv_pair_uses_its_own_layers():
    pair = solve(32, N, "fastv", avg_t=128)
    assert pair.prune.layers == (3,) and pair.reroute.layers == (3, 7, 15, 23)
    assert pair.prune.keep[0] == pair.reroute.keep[0]  # same first layer => same count
    assert pair.prune.name == "FastV" and pair.reroute.name == "FastV + Reroute"
    custom = solve(32, N, "fastv", avg_t=100, layers=[5, 10])
    assert custom.prune.layers == (5,) and custom.reroute.layers == (5, 10)
    check_schedule(custom.prune, 100)
    check_schedule(custom.reroute, 100)


@pytest.mark.parametrize(
    ("method", "reroute", "target", "match"),
    [
        ("fastv", False, 40, r"target avg_T=40 is not reachable .*54\.91\.\.576\.00"),
        ("fastv", False, 600, r"target avg_T=600 is not reachable"),
        ("pdrop", True, 400, r"target avg_T=400 is not reachable .*\.\.382\.50"),
    ],
)
def test_unreachable_targets(method, reroute, target, match):
    with pytest.raises(ValueError, match=match):
        solve_schedule(32, N, method, reroute, avg_t=target)


def test_target_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        solve(32, N, "fastv")
    with pytest.raises(ValueError, match="exactly one"):
        solve(32, N, "fastv", avg_t=64, flops_fraction=0.2)
    with pytest.raises(ValueError, match="needs a ModelShape"):
        solve(32, N, "fastv", flops_fraction=0.2)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        solve(load_shape("llava-1.5-7b"), N, "fastv", flops_fraction=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        solve(32, N, "pdrop", avg_t=64, layers=[7, 2])


# decoder shapes copied from the official config.json files (text_config), not read from the package:
# (num_layers, hidden d, FFN m, heads, kv heads, head_dim)
HAND_SHAPES = {
    "llava-1.5-7b": (32, 4096, 11008, 32, 32, 128),
    "qwen2.5-vl-7b": (28, 3584, 18944, 28, 4, 128),
}


def visual_per_layer_by_hand(num_layers: int, n_visual: int, layers, keep) -> list[int]:
    bounds = [*layers, num_layers]
    per_layer = [n_visual] * bounds[0]
    for i, k in enumerate(keep):
        per_layer += [k] * (bounds[i + 1] - bounds[i])
    assert len(per_layer) == num_layers
    return per_layer


def pdrop_macs_by_hand(model: str, n_visual: int, n_text: int, layers, keep, images: int = 1) -> int:
    """PyramidDrop's MACs (4nd² + 2n²d + 3ndm per layer, n = text + visual), written out by hand."""
    num_layers, d, m = HAND_SHAPES[model][:3]
    per_layer = visual_per_layer_by_hand(num_layers, n_visual, layers, keep)
    return sum(4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m for n in (n_text + images * v for v in per_layer))


def test_hand_macs_reproduce_the_published_facts():
    # PyramidDrop's convention (image tokens only): vanilla LLaVA-1.5-7B is 3.82 T MACs, its own
    # schedule [8, 16, 24] × [288, 144, 72] 1.78 T; KV per token 512 KiB and 56 KiB (fp16/bf16)
    assert round(pdrop_macs_by_hand("llava-1.5-7b", 576, 0, [], []) / 1e12, 2) == 3.82
    assert round(pdrop_macs_by_hand("llava-1.5-7b", 576, 0, [8, 16, 24], [288, 144, 72]) / 1e12, 2) == 1.78
    for model, kib in (("llava-1.5-7b", 512), ("qwen2.5-vl-7b", 56)):
        num_layers, *_, kv_heads, head_dim = HAND_SHAPES[model]
        assert num_layers * 2 * kv_heads * head_dim * 2 == kib * 1024


@pytest.mark.parametrize("model", ["llava-1.5-7b", "qwen2.5-vl-7b"])
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_flops_target(model, method):
    shape = load_shape(model)
    num_layers, d, m, heads, kv_heads, head_dim = HAND_SHAPES[model]
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (num_layers, d, m)
    n_text = 50
    vanilla = pdrop_macs_by_hand(model, N, n_text, [], [])
    pair = solve(shape, N, method, flops_fraction=0.4, n_text=n_text)
    for s in (pair.prune, pair.reroute):
        macs = pdrop_macs_by_hand(model, N, n_text, s.layers, s.keep)
        assert abs(macs / vanilla - 0.4) < 0.005  # the solver hit the target, counted by hand
        b = s.budget(shape, n_text)
        assert (b.flops_pdrop, b.vanilla_flops_pdrop) == (macs, vanilla)
        assert b.avg_visual_tokens == pytest.approx(avg_by_hand(num_layers, N, s.layers, s.keep))
        vanilla_kv = num_layers * (n_text + N) * 2 * kv_heads * head_dim * 2
        assert b.vanilla_kv_bytes == vanilla_kv
        per_layer = visual_per_layer_by_hand(num_layers, N, s.layers, s.keep)
        assert b.kv_bytes == sum((n_text + v) * 2 * kv_heads * head_dim * 2 for v in per_layer)
        assert (b.num_images, b.layers, b.keep, b.reroute) == (1, s.layers, s.keep, s.reroute)
        two = s.budget(shape, n_text, num_images=2)  # num_images is handed on: 2 images per layer
        assert two.flops_pdrop == pdrop_macs_by_hand(model, N, n_text, s.layers, s.keep, images=2)


# ---- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", PRESET_MODELS)
def test_presets_hit_their_tiers(model):
    num_layers = load_shape(model).num_layers
    for tier, method, reroute in itertools.product(TIERS, ("fastv", "pdrop"), (False, True)):
        s = preset(model, tier, method, reroute)
        assert s.num_layers == num_layers and s.n_visual == 576
        assert s.layers == default_layers(method, num_layers, reroute)
        assert (s.method, s.reroute) == (method, reroute)
        check_schedule(s, tier)


def test_preset_errors_and_table():
    with pytest.raises(ValueError, match="tiers: 192, 128, 64"):
        preset("llava-1.5-7b", 100, "fastv")
    with pytest.raises(ValueError, match="known models"):
        preset("llava-9", 64, "fastv")
    rows = table()
    assert len(rows) == len(PRESET_MODELS) * len(TIERS) * 2 * len(tabulated_methods())
    assert all(abs(r["avg_t"] - r["tier"]) <= 0.5 for r in rows)
    assert all(0 < r["flops_pdrop_ratio"] < 0.4 for r in rows)


def test_close_gap_walks_when_one_step_is_not_enough():
    # private helper: from a far start it walks stage by stage and ends within tolerance
    from vlm_reroute.budget.search import close_gap

    keep = close_gap((5, 5, 5, 5), [5, 8, 8, 9], goal=1000, tol=16, n=576, same_count=False)
    assert abs(sum(k * w for k, w in zip(keep, [5, 8, 8, 9], strict=True)) - 1000) <= 16
    assert all(b <= a for a, b in itertools.pairwise(keep))


def test_docs_tables_are_current(capsys):
    root = Path(__file__).resolve().parents[2]
    runpy.run_path(str(root / "benchmarks" / "budget_tables.py"), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    assert printed and printed in (root / "docs" / "budgets.md").read_text(encoding="utf-8"), (
        "docs/budgets.md is stale: regenerate with PYTHONPATH=src python benchmarks/budget_tables.py"
    )
