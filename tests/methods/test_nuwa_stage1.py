"""Nüwa stage 1 on synthetic maps: separation, alignment, gate and aggregation (nuwa.md §1.2–1.4, §3.1, §9).

Every vectorised result is compared with a slow reference written independently: per-cell and
per-anchor Python loops in float64, and a transcription of the release's own Qwen selection.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from vlm_reroute.methods.nuwa.aggregate import (
    WEIGHTINGS,
    Anchors,
    aggregate,
    gate,
    llava_tau,
    qwen_tau,
    run_stage1,
)
from vlm_reroute.methods.nuwa.select import (
    candidate_count,
    qwen_anchor_count,
    select_anchors,
    select_anchors_per_image,
)


def distinct(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Positive, pairwise distinct salience (no ties, like real attention)."""
    gen = torch.Generator().manual_seed(seed)
    n = height * width
    return torch.stack([(torch.randperm(n, generator=gen) + 1).float() / n for _ in range(batch)]).view(
        batch, height, width
    )


# ---------------------------------------------------------------- references (slow, independent)


def ref_select(sal: torch.Tensor, n: int, k1: int) -> list[int]:
    """Loops over cells as the spec words it; padding is the lowest score; ties to the earlier position."""
    height, width = sal.shape
    cand = []
    for cy in range(0, height + height % 2, 2):
        for cx in range(0, width + width % 2, 2):
            cell = [(y, x) for y in (cy, cy + 1) for x in (cx, cx + 1)]
            scored = [
                (-(float(sal[y, x]) if y < height and x < width else -math.inf), i, y, x)
                for i, (y, x) in enumerate(cell)
            ]
            cand += [(s, y, x) for s, _, y, x in sorted(scored)[:n]]
    ranked = sorted(cand, key=lambda c: (c[0], c[1] * (width + 1) + c[2]))[:k1]
    return sorted(y * width + x for _, y, x in ranked if y < height and x < width)


def release_qwen_select(sal: torch.Tensor, n: int, k1: int) -> list[int]:
    """The release's Qwen2.5-VL selection (nuwa.md §3.1): zero padding, unfold, topk, drop padding."""
    height, width = sal.shape
    pad_h, pad_w = (2 - height % 2) % 2, (2 - width % 2) % 2
    pw = width + pad_w
    metric = F.pad(sal, (0, pad_w, 0, pad_h), value=0)
    regions = metric.unfold(0, 2, 2).unfold(1, 2, 2).reshape(-1, 4)
    _, local = regions.topk(k=n, dim=-1)
    ids = torch.arange(regions.shape[0])
    gy = ((ids // (pw // 2)) * 2)[:, None] + local // 2
    gx = ((ids % (pw // 2)) * 2)[:, None] + local % 2
    candidates = (gy * pw + gx).view(1, -1)
    scores = metric.flatten()[None].gather(1, candidates)
    keep = min(k1, candidates.shape[1])
    bench = candidates.gather(1, scores.topk(keep, dim=1).indices).sort().values[0]
    y, x = bench // pw, bench % pw
    bench = bench[(y < height) & (x < width)]
    return sorted(int(b // pw) * width + int(b % pw) for b in bench)


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


GRIDS = [(24, 24), (23, 17), (5, 5), (1, 1), (2, 3), (7, 4)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_select_matches_loop_reference(grid, n):
    limit = candidate_count(*grid, n)
    k1s = [1, max(1, limit // 2), limit]
    sal = distinct(3, *grid, seed=n)
    anchors = select_anchors(sal, n, k1s)
    for b in range(3):
        assert anchors.per_image()[b].tolist() == ref_select(sal[b], n, k1s[b])
        assert anchors.per_image()[b].tolist() == release_qwen_select(sal[b], n, k1s[b])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_at_most_n_per_cell_sorted_strictly_increasing(grid, n):
    height, width = grid
    anchors = select_anchors(distinct(2, *grid, seed=7), n, candidate_count(*grid, n))
    for row in anchors.per_image():
        assert bool((row[1:] > row[:-1]).all())
        assert int(row.min()) >= 0 and int(row.max()) < height * width
        cells = (row // width // 2) * ((width + 1) // 2) + (row % width) // 2
        assert int(torch.bincount(cells).max()) <= n
    # every row of the batched index stays sorted, filler included
    assert bool((anchors.index[:, 1:] >= anchors.index[:, :-1]).all())


@pytest.mark.parametrize(("n", "k1"), [(1, 112), (2, 224), (3, 336)])
def test_llava_budgets_give_exactly_k1(n, k1):
    anchors = select_anchors(distinct(2, 24, 24), n, k1)
    assert anchors.counts.tolist() == [k1, k1]


def test_one_per_cell_at_full_count_is_each_cells_argmax():
    sal = distinct(1, 24, 24, seed=3)[0]
    anchors = select_anchors(sal[None], 1, 144).per_image()[0]
    argmax = sal.view(12, 2, 12, 2).permute(0, 2, 1, 3).reshape(144, 4).argmax(dim=1)
    expected = sorted(
        ((i // 12) * 2 + int(a) // 2) * 24 + (i % 12) * 2 + int(a) % 2 for i, a in enumerate(argmax)
    )
    assert anchors.tolist() == expected


def test_qwen_padding_example():
    """nuwa.md §9: 23×17 at ratio 0.5 pads to 24×18; K₁ = ceil(0.6·391) = 235, minus anchors on padding."""
    assert candidate_count(23, 17, 3) == 12 * 9 * 3
    k1 = qwen_anchor_count(23, 17, 0.6, 3)
    assert k1 == 235
    sal = distinct(1, 23, 17, seed=11)
    anchors = select_anchors(sal, 3, k1)
    assert anchors.counts.tolist() == [235]  # 264 real candidates outrank every padded one
    assert anchors.per_image()[0].tolist() == release_qwen_select(sal[0], 3, k1)


def test_qwen_padding_drops_anchors_when_padding_makes_the_cut():
    # 5×5 → 6×6, n = 3: 21 real candidates, K₁ = ceil(25·0.85) = 22 → the release keeps 21
    k1 = qwen_anchor_count(5, 5, 0.85, 3)
    assert k1 == 22
    sal = distinct(1, 5, 5, seed=2)
    kept = select_anchors(sal, 3, k1).per_image()[0].tolist()
    assert len(kept) == 21
    assert kept == release_qwen_select(sal[0], 3, k1)


def test_qwen_anchor_count_clips_to_candidates_as_released():
    assert qwen_anchor_count(2, 2, 1.0, 1) == 1  # ceil(4·1) = 4 > |C| = 1
    assert qwen_anchor_count(4, 5, 0.35, 3) == 7  # ceil(20·0.35)
    assert qwen_anchor_count(4, 5, 0.36, 3) == 8  # ceil(7.2)


def test_four_per_cell_is_global_top_k():
    sal = distinct(2, 9, 7, seed=4)
    anchors = select_anchors(sal, 4, 20)
    for b in range(2):
        assert anchors.per_image()[b].tolist() == sorted(sal[b].flatten().topk(20).indices.tolist())


def test_ties_break_by_raster_order_and_batch_equals_single():
    sal = torch.ones(3, 6, 6)
    sal[1, 2:4, 2:4] = 2.0
    sal[2] = distinct(1, 6, 6, seed=5)[0].round(decimals=1)  # many ties
    batched = select_anchors(sal, 2, 7)
    for b in range(3):
        single = select_anchors(sal[b : b + 1], 2, 7)
        assert torch.equal(batched.index[b, : int(batched.counts[b])], single.per_image()[0])
        assert single.per_image()[0].tolist() == ref_select(sal[b], 2, 7)


def test_per_image_list_groups_grids():
    sals = [distinct(1, 6, 6, seed=i)[0] if i % 2 else distinct(1, 5, 9, seed=i)[0] for i in range(5)]
    k1s = [3, 4, 5, 6, 7]
    got = select_anchors_per_image(sals, 2, k1s)
    for sal, k, row in zip(sals, k1s, got, strict=True):
        assert row.tolist() == ref_select(sal, 2, k)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: select_anchors(torch.rand(1, 4, 4), 0, 2), "n_per_cell=0"),
        (lambda: select_anchors(torch.rand(1, 4, 4), 5, 2), "n_per_cell=5"),
        (lambda: select_anchors(torch.rand(1, 4, 4), True, 2), "n_per_cell=True"),
        (lambda: select_anchors(torch.rand(1, 4, 4), 1, 5), r"k1=\[5\]: each image needs 1 ≤ k1 ≤ 4"),
        (lambda: select_anchors(torch.rand(1, 4, 4), 1, 0), r"k1=\[0\]"),
        (lambda: select_anchors(torch.rand(2, 4, 4), 1, [1, 2, 3]), "k1 has 3 entries for 2 images"),
        (lambda: select_anchors(torch.rand(4, 4), 1, 2), r"shape \(4, 4\)"),
        (lambda: select_anchors(torch.full((1, 2, 2), float("nan")), 1, 1), "NaN"),
        (lambda: select_anchors_per_image([torch.rand(2, 2)], 1, [1, 1]), "k1 has 2 entries for 1 images"),
        (lambda: qwen_anchor_count(4, 4, 0.0, 3), "ratio=0.0"),
    ],
)
def test_select_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- gate and aggregation


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
