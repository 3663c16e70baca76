"""Nüwa stage 1, gate and aggregation on synthetic maps (nuwa.md §1.4, §3.1, §9).

Every vectorised result is compared with a slow per-anchor Python loop in float64, written
independently.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from nuwa_support import distinct, ref_select

from vlm_reroute.methods.nuwa.aggregate import (
    WEIGHTINGS,
    Anchors,
    aggregate,
    gate,
    llava_tau,
    qwen_tau,
    run_stage1,
)
from vlm_reroute.methods.nuwa.select import qwen_anchor_count, select_anchors


def ref_aggregate(x, f, s, anchors, grid, tau, q, weighting):
    """One image, one anchor at a time, one token at a time, float64."""
    height, width = grid
    x64, f64, s64 = x.double(), f.double(), s.double()
    theta = float(torch.quantile(s64[anchors], q))
    out, low = [], []
    for p in anchors:
        if float(s64[p]) >= theta:
            out.append(x64[p])
            low.append(False)
            continue
        w = []
        for j in range(height * width):
            cos = float(f64[p] @ f64[j] / (f64[p].norm().clamp_min(1e-12) * f64[j].norm().clamp_min(1e-12)))
            dist = math.hypot(p // width - j // width, p % width - j % width)
            w.append(max(cos, 0.0) * max(0.0, 1.0 - dist / tau))
        w = torch.tensor(w, dtype=torch.float64)
        if weighting == "convex":
            w[p] = 1.0
            row = w / w.sum()
        elif weighting == "release_qwen":
            row = w / (w.sum() + 1e-8)
        else:
            row = w / (w.sum() + 1e-8)
            row[p] = 1.0
        out.append(row @ x64)
        low.append(True)
    return torch.stack(out), torch.tensor(low), theta


# ---------------------------------------------------------------- separation and alignment


def synthetic(batch, grid, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    x = torch.randn(batch, n, dim, generator=gen)
    f = torch.randn(batch, n, 5, generator=gen) + 0.5  # mostly positive cosines: real mixing
    return x, f, distinct(batch, *grid, seed=seed)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize(
    ("grid", "n", "k1", "tau", "q"),
    [((6, 6), 1, [7, 9], 3.0, 0.55), ((5, 5), 3, [22, 15], 2.5, 0.1), ((4, 7), 2, [10, 16], 30.0, 0.9)],
)
def test_aggregate_matches_loop_reference(weighting, grid, n, k1, tau, q):
    x, f, s = synthetic(2, grid, seed=len(weighting) + n)
    anchors = select_anchors(s, n, k1)
    got = aggregate(x, f, s.flatten(1), anchors, tau, q, weighting)
    for b in range(2):
        keep = anchors.per_image()[b].tolist()
        feats, low, theta = ref_aggregate(x[b], f[b], s[b].flatten(), keep, grid, tau, q, weighting)
        k = len(keep)
        assert torch.allclose(got.features[b, :k].double(), feats, atol=1e-5)
        assert got.aggregated[b, :k].tolist() == low.tolist()
        assert math.isclose(float(got.threshold[b]), theta, rel_tol=1e-6)
        assert not bool(got.aggregated[b, k:].any()) and bool((got.features[b, k:] == 0).all())
        assert bool(low.any()) and not bool(low.all())  # the case mixes both kinds


def test_gate_quantile_zero_is_plain_region_top_k():
    x, f, s = synthetic(2, (8, 8))
    anchors = select_anchors(s, 2, 20)
    got = aggregate(x, f, s.flatten(1), anchors, 4.0, 0.0)
    assert not bool(got.aggregated.any())
    assert torch.equal(got.features, x.gather(1, anchors.index[..., None].expand(-1, -1, x.shape[-1])))
    assert anchors.per_image()[0].tolist() == ref_select(s[0], 2, 20)


def test_gate_quantile_one_keeps_only_the_top_anchor():
    x, f, s = synthetic(2, (8, 8), seed=3)
    anchors = select_anchors(s, 2, 20)
    got = aggregate(x, f, s.flatten(1), anchors, 4.0, 1.0)
    for b in range(2):
        anchor_sal = s[b].flatten()[anchors.index[b]]
        assert (~got.aggregated[b]).nonzero().flatten().tolist() == [int(anchor_sal.argmax())]
        assert float(got.threshold[b]) == float(anchor_sal.max())


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_high_anchors_keep_their_features_bit_for_bit(weighting):
    x, f, s = synthetic(3, (7, 9), dim=16, seed=8)
    anchors = select_anchors(s, 2, [20, 25, 30])
    got = aggregate(x.half(), f, s.flatten(1), anchors, 5.0, 0.4, weighting)
    original = x.half().gather(1, anchors.index.clamp(max=62)[..., None].expand(-1, -1, 16))
    high = anchors.valid & ~got.aggregated
    assert torch.equal(got.features[high], original[high])
    assert not torch.equal(got.features[got.aggregated], original[got.aggregated])


@pytest.mark.parametrize(("n", "k1", "high"), [(1, 112, 50), (2, 224, 101), (3, 336, 151)])
def test_llava_gate_counts(n, k1, high):
    """nuwa.md §1.4: with distinct scores the 0.55-quantile leaves 50 / 101 / 151 anchors high."""
    s = distinct(1, 24, 24, seed=n)
    theta, is_high = gate(s.flatten(1), select_anchors(s, n, k1), 0.55)
    assert int(is_high.sum()) == high


def test_gate_threshold_is_torch_quantile_of_each_images_anchors():
    s = distinct(2, 5, 5, seed=1)
    anchors = select_anchors(s, 3, [22, 9])  # image 0 loses one anchor to padding
    theta, _ = gate(s.flatten(1), anchors, 0.3)
    for b, row in enumerate(anchors.per_image()):
        assert float(theta[b]) == float(torch.quantile(s[b].flatten()[row], 0.3))


def test_weightings_on_a_constant_image():
    """Convex rows reproduce a constant feature; the LLaVA release's rows weigh 2 − 1/Z ∈ (1, 2)."""
    _, f, s = synthetic(1, (6, 6), seed=2)
    x = torch.ones(1, 36, 3)
    anchors = select_anchors(s, 1, 9)
    convex = aggregate(x, f, s.flatten(1), anchors, 10.0, 0.5, "convex")
    qwen = aggregate(x, f, s.flatten(1), anchors, 10.0, 0.5, "release_qwen")
    llava = aggregate(x, f, s.flatten(1), anchors, 10.0, 0.5, "release_llava")
    low = convex.aggregated[0]
    assert int(low.sum()) == 4
    assert torch.allclose(convex.features[0], torch.ones(9, 3), atol=1e-6)
    assert torch.allclose(qwen.features[0], torch.ones(9, 3), atol=1e-6)
    total = llava.features[0, low, 0]
    assert bool((total > 1.05).all()) and bool((total < 2).all())
    assert torch.equal(llava.features[0, ~low], torch.ones(5, 3))


def test_aggregation_builds_anchor_rows_only():
    """No (N × N) matrix: every batched matmul has one side of at most the low-anchor count."""
    x, f, s = synthetic(2, (40, 40), dim=4, seed=6)
    anchors = select_anchors(s, 1, 30)
    with mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
        got = aggregate(x, f, s.flatten(1), anchors, llava_tau(), 0.55)
    low = int(got.aggregated.sum(dim=1).max())
    assert bmm.call_count == 2
    for call in bmm.call_args_list:
        assert call.args[0].shape[1] == low  # rows: the aggregating anchors, not the 1600 tokens


def test_aggregate_batch_equals_single():
    x, f, s = synthetic(3, (7, 5), seed=9)
    anchors = select_anchors(s, 3, [12, 24, 18])
    batched = aggregate(x, f, s.flatten(1), anchors, 3.0, 0.5)
    for b in range(3):
        one = aggregate(
            x[b : b + 1],
            f[b : b + 1],
            s[b : b + 1].flatten(1),
            select_anchors(s[b : b + 1], 3, [12, 24, 18][b]),
            3.0,
            0.5,
        )
        k = int(anchors.counts[b])
        assert torch.allclose(batched.features[b, :k], one.features[0], atol=1e-6)
        assert torch.equal(batched.aggregated[b, :k], one.aggregated[0])


def test_taus():
    assert math.isclose(llava_tau(), math.sqrt(280))
    assert math.isclose(qwen_tau(23, 17), 0.8 * math.sqrt(23**2 + 17**2))  # padded 24×18
    assert math.isclose(qwen_tau(24, 18), 0.8 * math.sqrt(23**2 + 17**2))


def test_run_stage1_mixes_grids_like_single_images():
    grids = [(6, 6), (5, 7), (6, 6)]
    data = [synthetic(1, g, seed=i) for i, g in enumerate(grids)]
    feats, sims, sals = [d[0][0] for d in data], [d[1][0] for d in data], [d[2][0] for d in data]
    taus = [qwen_tau(*g) for g in grids]
    k1s = [qwen_anchor_count(*g, 0.6, 3) for g in grids]
    results = run_stage1(feats, sims, sals, 3, k1s, taus, 0.1)
    for i, res in enumerate(results):
        anchors = select_anchors(sals[i][None], 3, k1s[i])
        one = aggregate(feats[i][None], sims[i][None], sals[i].flatten()[None], anchors, taus[i], 0.1)
        assert torch.equal(res.anchors, anchors.per_image()[0])
        assert torch.allclose(res.features, one.features[0], atol=1e-6)
        assert torch.equal(res.aggregated, one.aggregated[0])
        assert res.threshold == float(one.threshold[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weighting": "average"}, "weighting='average'"),
        ({"tau": 0.0}, "tau=0.0"),
        ({"gate_quantile": 1.5}, "quantile=1.5"),
        ({"salience": torch.rand(1, 15)}, "must all cover the 4×4 grid"),
    ],
)
def test_aggregate_errors(kwargs, match):
    x, f, s = synthetic(1, (4, 4))
    args = {"features": x, "similarity": f, "salience": s.flatten(1), "anchors": select_anchors(s, 1, 3)}
    args |= {"tau": 2.0, "gate_quantile": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        aggregate(**args)


def test_run_stage1_errors():
    x, f, s = synthetic(2, (4, 4))
    with pytest.raises(ValueError, match="give one per image"):
        run_stage1([x[0]], [f[0], f[1]], [s[0], s[1]], 1, 2, 2.0, 0.5)
    with pytest.raises(ValueError, match=r"share a grid but have radii \[1.0, 2.0\]"):
        run_stage1([x[0], x[1]], [f[0], f[1]], [s[0], s[1]], 1, 2, [1.0, 2.0], 0.5)


def test_anchors_type():
    anchors = select_anchors(distinct(1, 3, 3), 1, 4)
    assert isinstance(anchors, Anchors) and anchors.grid == (3, 3)
