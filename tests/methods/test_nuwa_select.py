"""Nüwa stage 1, separation and alignment on synthetic maps (nuwa.md §1.2–1.3, §3.1, §9).

Every vectorised selection is compared with a slow reference written independently: a per-cell
Python loop, and a transcription of the release's own Qwen selection.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nuwa_support import distinct, ref_select

from vlm_reroute.methods.nuwa.select import (
    candidate_count,
    qwen_anchor_count,
    select_anchors,
    select_anchors_per_image,
)


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
