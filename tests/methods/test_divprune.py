"""DivPrune (arXiv 2503.02175): the greedy max–min selection and the stage in the engine.

The reference greedy is written here from ``methods.md`` §4 (full ``N × N`` distance matrix in
float64, "first = token whose nearest neighbour is farthest, then argmax of min distance to the
selected set"); the engine's logits are checked against ``nuwa_reference``'s hand-driven decoder on
the sequence that keeps only the selected image tokens at their original positions.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import small_inputs, small_model_for
from nuwa_reference import embeddings_and_positions, nuwa_reference

from vlm_reroute import BudgetTarget
from vlm_reroute.methods import DivPrune, FastV, MethodSpec, PDrop, VisionZip
from vlm_reroute.scoring.divprune import divprune_select, nearest_distance


def distances(x: torch.Tensor) -> torch.Tensor:
    """``1 − cos`` between every pair, float64."""
    unit = x.double() / x.double().norm(dim=1, keepdim=True)
    return 1.0 - unit @ unit.T


def greedy_reference(x: torch.Tensor, k: int) -> list[int]:
    """The MMDP greedy with the full matrix, loops over tokens (ties: lowest index)."""
    d = distances(x)
    n = x.shape[0]
    nearest = [min(d[i, j].item() for j in range(n) if j != i) for i in range(n)]
    far = max(nearest)
    picks = [min(i for i in range(n) if nearest[i] >= far - 1e-6)]  # mutual neighbours tie: lowest index
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(d[i, j].item() for j in picks), -i)))
    return picks


@pytest.mark.parametrize("seed", range(6))
def test_greedy_matches_the_full_matrix_greedy(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 5 + seed * 3
    x = torch.randn(n, 7, generator=gen)
    for k in (1, 2, n // 2, n):
        assert divprune_select(x, k).tolist() == greedy_reference(x, k)
        assert divprune_select(x, k, tile=3).tolist() == greedy_reference(x, k)  # tiles change nothing


def test_nearest_distance_by_tiles():
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(1))
    d = distances(x) + torch.eye(11, dtype=torch.float64) * 10
    expected = d.min(dim=1).values.float()
    for tile in (1, 4, 11, 64):
        torch.testing.assert_close(nearest_distance(x, tile), expected, rtol=1e-5, atol=1e-6)


def test_greedy_is_a_half_approximation_of_the_brute_force_max_min():
    """On small sets, the greedy's smallest pairwise distance is at least half the brute-force
    optimum's (the max–min dispersion greedy's guarantee when ``1 − cos`` is a metric on the set;
    points on a circle, where the angle is one)."""
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(9, generator=gen) * torch.pi  # a half circle: 1 − cos of angle gaps
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    gap = (angles[:, None] - angles[None, :]).abs()
    for k in (2, 3, 4):
        picks = divprune_select(x, k).tolist()
        achieved = min(gap[i, j].item() for i, j in itertools.combinations(picks, 2))
        best = max(
            min(gap[i, j].item() for i, j in itertools.combinations(subset, 2))
            for subset in itertools.combinations(range(9), k)
        )
        assert achieved >= best / 2 - 1e-6
        assert len(set(picks)) == k


def test_duplicates_are_picked_last():
    """Exact duplicates have distance 0: a diverse set takes one of each before any copy."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    x = torch.cat([base, base[:2]])
    picks = divprune_select(x, 4).tolist()
    assert len({p if p < 4 else p - 4 for p in picks}) == 4  # rows 4, 5 copy rows 0, 1


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
def test_engine_matches_the_reference(family):
    """Stage 1 keeps exactly the greedy's picks on the language model's input rows, and the logits equal
    the decoder run on text + those tokens at their original positions."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    embeds, _ = embeddings_and_positions(model, inputs)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    rows = embeds[0, visual]
    method = DivPrune(k=12)
    with method(model) as trace:
        logits = model(**inputs).logits[0]
    picks = greedy_reference(rows, 12)
    record = trace.stage1[0][0]
    assert record.picks.tolist() == picks
    kept = torch.tensor(sorted(picks))
    assert torch.equal(trace.decisions[0].selected[0], kept) and trace.decisions[0].layer == 0
    assert trace.decisions[1].kept == [12]  # the pass-through decision keeps what entered
    ref, _ = nuwa_reference(model, inputs, [rows], [kept], [4], [kept], False)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-4, atol=1e-4)


def test_composition_runs_the_in_decoder_method_on_what_entered():
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=3)
    alone = DivPrune(k=20)
    composed = alone + PDrop(layers=[2, 5], keep=[0.5, 0.25], reroute=True)
    with alone(model) as first:
        model(**inputs)
    with composed(model) as trace:
        model(**inputs)
    assert composed.name == "DivPrune + PDrop + Reroute"
    assert torch.equal(trace.decisions[0].selected[0], first.decisions[0].selected[0])
    assert [d.layer for d in trace.decisions] == [0, 2, 5]
    assert [d.kept for d in trace.decisions] == [[20], [10], [5]]
    entered = set(trace.decisions[0].selected[0].tolist())
    assert all(set(d.selected[0].tolist()) <= entered for d in trace.decisions[1:])
    assert trace.tokens_per_layer(8) == [20, 20, 10, 10, 10, 5, 5, 5]


def test_a_target_solves_the_entry():
    """Alone, the rule is entry a, then a at each decision: avg_T 16 lets 16 tokens in."""
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=3)
    with DivPrune(target=BudgetTarget(avg_t=16))(model) as trace:
        model(**inputs)
    assert trace.tokens_per_layer(8) == [16] * 8


def test_spec_strings_compose():
    spec = MethodSpec.parse("divprune+pdrop+reroute", tier=12, k=24)
    method = spec.build()
    assert spec.key == "divprune+pdrop" and spec.reroute and spec.name == "DivPrune + PDrop + Reroute"
    assert isinstance(method, DivPrune) and isinstance(method.then, PDrop) and method.k == 24
    assert method.then.target == BudgetTarget(avg_t=12) and method.reroute
    model = small_model_for("llava")
    with method(model) as trace:
        model(**small_inputs(model, (20,), seed=3))
    assert abs(sum(trace.tokens_per_layer(8)) / 8 - 12) <= 0.5 and trace.decisions[0].kept == [24]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: DivPrune(k=0), ValueError, r"keep=0\): a token count must be ≥ 1"),
        (lambda: DivPrune(k=1.5), ValueError, r"keep=1.5\): a keep ratio must be in \(0, 1\]"),
        (lambda: DivPrune(keep=[0.5]), ValueError, r"DivPrune\(keep=\[0.5\]\): give the decision layers"),
        (lambda: DivPrune(k=8, target=BudgetTarget(avg_t=4)), ValueError, r"give a target or counts"),
        (lambda: DivPrune(layers=[4], then=FastV()), ValueError, r"the in-decoder method decides layers"),
        (lambda: DivPrune(then=VisionZip()), TypeError, r"not a stage-1 method"),
        (lambda: PDrop() + DivPrune(), TypeError, r"the stage-1 method comes first"),
        (lambda: MethodSpec.parse("divprune+visionzip"), ValueError, r"not by another stage-1 method"),
    ],
)
def test_bad_settings(build, error, match):
    with pytest.raises(error, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_a_budget_larger_than_the_image_is_one_line():
    model = small_model_for("llava")
    with (
        pytest.raises(
            ValueError, match=r"DivPrune: 100 tokens per image enter .* an image here has 64"
        ) as info,
        DivPrune(k=100)(model),
    ):
        model(**small_inputs(model, (20,), seed=3))
    assert "\n" not in str(info.value).split("\n\n")[0]


def test_the_vision_side_is_priced():
    from vlm_reroute.budget.stage1 import CLIP, VisionTower, divprune_macs, visionzip_macs

    assert divprune_macs(576, 56, 4096) == 576 * 576 * 4096 + 55 * 576 * 4096
    assert divprune_macs(576, 576, 4096) == 0  # everything kept: no selection
    clip = VisionTower(CLIP, 1024, 0.55)
    salience = 578 * 1024 * 1024 + 577 * 1024
    assert visionzip_macs(576, 54, 10, clip, 64, 4096) == salience + 512 * 10 * 64 + 512 * 4096
    with pytest.raises(ValueError, match=r"k=600: DivPrune keeps 1..576"):
        divprune_macs(576, 600, 4096)
