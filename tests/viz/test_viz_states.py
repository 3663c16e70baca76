"""Pictures, the arithmetic: token states, cells, box shares on hand-built traces, and the
placement of cells on the original picture checked against what the real image processors do."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, Qwen2VLImageProcessorPil

from vlm_reroute.adapters.layout import GridView, ImageLayout
from vlm_reroute.engine.trace import Decision, Trace
from vlm_reroute.viz.coverage import box_coverage
from vlm_reroute.viz.geometry import Placement, check_box, placement_for
from vlm_reroute.viz.states import (
    DEFERRED,
    KEPT,
    REENTERED,
    REMOVED,
    candidate_scores,
    image_cells,
    image_states,
    token_states,
    trace_reroute,
)

REROUTE = "PDrop(layers=(2, 5), keep=(5, 4), reroute=True, score_from='current', scorer=None, target=None)"
PRUNE = REROUTE.replace("reroute=True", "reroute=False")


def layout(sample: int, image: int, offset: int, rows: int, cols: int, **kw) -> ImageLayout:
    return ImageLayout(sample, image, offset, rows * cols, (0, rows * cols), (GridView(rows, cols),), **kw)


def hand_trace(method: str, selected: list[list[int]], layers=(2, 5), layouts=None, n: int = 10) -> Trace:
    """One sample of ``n`` visual tokens: image 0 is a 2×3 grid (tokens 0-5), image 1 a 2×2 grid (6-9)."""
    layouts = layouts or [[layout(0, 0, 0, 2, 3), layout(0, 1, 6, 2, 2)]]
    decisions = [
        Decision(
            layer=layer,
            selected=[torch.tensor(s)],
            scores=[torch.arange(1, n + 1, dtype=torch.float) / 100],
            reentered=[0],
        )
        for layer, s in zip(layers, selected, strict=True)
    ]
    return Trace(method=method, decisions=decisions, visual_tokens=[n], layouts=layouts)


def test_states_under_reroute_and_prune_match_the_definitions():
    K, R, D, X = KEPT, REENTERED, DEFERRED, REMOVED
    reroute = hand_trace(REROUTE, [[0, 1, 2, 6, 7], [1, 4, 8, 9]])
    assert token_states(reroute).tolist() == [
        [K, K, K, D, D, D, K, K, D, D],
        [D, K, D, D, R, D, D, D, R, R],
    ]
    prune = hand_trace(PRUNE, [[0, 1, 2, 6, 7], [1, 2, 7]])
    assert token_states(prune).tolist() == [
        [K, K, K, X, X, X, K, K, X, X],
        [X, K, K, X, X, X, X, K, X, X],
    ]
    # image 1 (tokens 6..9) on its 2×2 grid, raster order
    assert image_cells(token_states(prune), prune.layouts[0][1])[1].tolist() == [[X, K], [X, X]]
    cells = image_states(reroute, 0, 0)
    assert cells.title(1) == "layer 5\nkept 1 · re-entered 1 · deferred 4"
    assert image_states(prune, 0, 1).title(0) == "layer 2\nkept 2 · removed 2"


def test_prune_scores_hide_tokens_that_were_no_candidates():
    prune = hand_trace(PRUNE, [[0, 1, 2, 6, 7], [1, 2, 7]])
    scores = candidate_scores(prune)
    assert torch.isnan(scores[1]).tolist() == [False] * 3 + [True] * 3 + [False] * 2 + [True] * 2
    assert not torch.isnan(scores[0]).any()
    assert not torch.isnan(candidate_scores(hand_trace(REROUTE, [[0], [5]]))).any()


def test_mode_is_read_from_the_method_and_a_comeback_under_prune_is_refused():
    assert trace_reroute(hand_trace(REROUTE, [[0], [1]])) is True
    assert trace_reroute(hand_trace(PRUNE, [[0], [1]])) is False
    assert trace_reroute(hand_trace("custom", [[0], [1]]), reroute=True) is True
    with pytest.raises(ValueError, match="prune or reroute"):
        trace_reroute(hand_trace("custom", [[0], [1]]))
    with pytest.raises(ValueError, match="did not run under prune"):
        token_states(hand_trace(PRUNE, [[0, 1], [1, 5]]))


def test_box_shares_by_hand():
    # a 40×30 px picture, one 3×4 grid of 10×10 px cells covering it
    placement = Placement((40, 30), (0.0, 0.0, 40.0, 30.0), (3, 4), "test")
    box = (6, 0, 25, 14)
    # column overlaps 0.4, 1, 0.5, 0; row overlaps 1, 0.4, 0 -> cells (0,1) and (0,2) are in the box
    assert placement.box_overlap(box)[0, 0] == pytest.approx(0.4)
    assert placement.box_overlap(box)[1, 2] == pytest.approx(0.2)
    assert np.argwhere(placement.box_cells(box)).tolist() == [[0, 1], [0, 2]]
    grid = [[layout(0, 0, 0, 3, 4)]]
    reroute = hand_trace(REROUTE, [[1, 5, 6], [1, 2, 8]], layouts=grid, n=12)
    cov = box_coverage(reroute, 0, 0, placement, box, num_layers=7)
    assert cov.cells == 2
    assert cov.box.tolist() == [1, 1, 0.5, 0.5, 0.5, 1, 1]  # the box comes back at layer 5
    assert cov.tokens.tolist() == [1, 1, 0.25, 0.25, 0.25, 0.25, 0.25]
    prune = hand_trace(PRUNE, [[1, 5, 6], [1]], layouts=grid, n=12)
    assert box_coverage(prune, 0, 0, placement, box, num_layers=7).box.tolist() == [1, 1] + [0.5] * 5
    with pytest.raises(ValueError, match="covers no cell"):
        box_coverage(prune, 0, 0, placement, (0, 0, 4, 4), num_layers=7)
    with pytest.raises(ValueError, match="x1 < x2"):
        check_box((5, 0, 50, 10), (40, 30))


def marker_picture(size: tuple[int, int], rect: tuple[int, int, int, int]) -> Image.Image:
    picture = Image.new("RGB", size, (0, 0, 0))
    picture.paste((255, 255, 255), rect)
    return picture


def bright_extent(frame: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """First and one-past-last bright column and row of a processed ``(3, H, W)`` frame in [0, 1]."""
    ys, xs = np.nonzero(frame[0] > threshold)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize(
    "processor, size, rect",
    [
        (CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size=112), (200, 150), (100, 30, 140, 90)),
        (CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size=112), (150, 200), (30, 100, 90, 140)),
        (
            LlavaImageProcessorPil(size={"shortest_edge": 112}, crop_size=112, do_pad=True),
            (150, 200),
            (30, 100, 90, 140),
        ),
    ],
    ids=["clip-landscape", "clip-portrait", "llava-pad"],
)
def test_cells_sit_where_the_processor_put_the_pixels(processor, size, rect):
    """A white rectangle on the original picture: where the processor put it in its frame, mapped
    back through the placement, is where it was (within one processed pixel)."""
    picture = marker_picture(size, rect)
    frame = processor(images=picture, do_normalize=False, return_tensors="np")["pixel_values"][0]
    assert frame.shape[1:] == (112, 112)
    placement = placement_for(processor, size, layout(0, 0, 0, 8, 8))
    x0, y0, x1, y1 = placement.frame
    sx, sy = (x1 - x0) / 112, (y1 - y0) / 112
    left, top, right, bottom = bright_extent(frame, 0.75)
    mapped = (x0 + left * sx, y0 + top * sy, x0 + right * sx, y0 + bottom * sy)
    assert mapped == pytest.approx(rect, abs=1.5 * max(sx, sy))
    if isinstance(processor, LlavaImageProcessorPil):
        assert x0 < 0 < 150 < x1  # padded to a square: the frame reaches beyond the picture
    else:
        assert x0 >= 0 and x1 <= size[0] and y0 >= 0 and y1 <= size[1]  # a crop lies inside it


def test_qwen_grid_covers_the_whole_picture_and_must_match_the_processor():
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=672 * 672)
    picture = Image.new("RGB", (200, 150))
    thw = processor(images=picture, return_tensors="pt")["image_grid_thw"][0].tolist()
    rows, cols = thw[1] // 2, thw[2] // 2
    assert (rows, cols) == (round(150 / 28), round(200 / 28))  # smart-resize to 140×196 px
    placement = placement_for(processor, picture.size, layout(0, 0, 0, rows, cols))
    assert placement.frame == (0, 0, 200, 150)
    with pytest.raises(ValueError, match="smart-resizes a 200×150 picture to 5×7"):
        placement_for(processor, picture.size, layout(0, 0, 0, 7, 5))


class UnknownImageProcessor:
    size = {"height": 224, "width": 224}


@pytest.mark.parametrize(
    "processor, lay, message",
    [
        (None, layout(0, 0, 0, 8, 8), "processor"),
        (UnknownImageProcessor(), layout(0, 0, 0, 8, 8), "UnknownImageProcessor"),
        (
            CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size=112, do_pad=True),
            layout(0, 0, 0, 8, 8),
            "do_pad",
        ),
        (CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size=112), layout(0, 0, 0, 8, 7), "tile"),
        (
            CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size=112),
            ImageLayout(0, 0, 0, 8, (0, 8), (GridView(2, 2), GridView(2, 2, box=(0, 0, 0.5, 0.5)))),
            "single-grid",
        ),
        (
            CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size=112),
            ImageLayout(0, 0, 0, 6, (0, 6), (GridView(2, 2),), extras=(2, 5)),
            "single-grid",
        ),
    ],
    ids=["no-processor", "unknown-processor", "clip-post-pad", "grid-mismatch", "two-views", "extras"],
)
def test_unknown_layouts_and_processors_are_refused(processor, lay, message):
    with pytest.raises(ValueError, match=message):
        placement_for(processor, (200, 150), lay)


def test_hand_crop_arithmetic():
    """LLaVA-style crop of a 200×150 picture, by hand: shortest edge 150 -> 112 px, long edge
    int(112·200/150) = 149 px, centre crop 112 from column (149-112)//2 = 18."""
    processor = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size=112)
    placement = placement_for(processor, (200, 150), layout(0, 0, 0, 8, 8))
    scale = 200 / 149
    assert placement.frame == pytest.approx((18 * scale, 0, 130 * scale, 150 * 112 / 112))
    assert math.isclose(placement.cell_edges()[1][1], 150 / 8)


def test_tokens_a_vision_side_stage_left_out_stay_removed_under_reroute():
    """A decision at layer 0 is a vision-side stage (DivPrune, VisionZip, Nüwa's stage 1): what it
    leaves out never enters the language model, so no later decision can defer or bring it back."""
    K, R, D, X = KEPT, REENTERED, DEFERRED, REMOVED
    method = "DivPrune(k=6, then=None, reroute=True)"
    trace = hand_trace(method, [[0, 1, 2, 3, 6, 7], [0, 1, 6], [2, 3, 6]], layers=(0, 2, 5))
    assert token_states(trace).tolist() == [
        [K, K, K, K, X, X, K, K, X, X],
        [K, K, D, D, X, X, K, D, X, X],
        [D, D, R, R, X, X, K, D, X, X],
    ]
    scores = candidate_scores(trace)
    assert not torch.isnan(scores[0]).any()  # every token is a candidate of the vision-side stage
    no_candidate = [False] * 4 + [True] * 2 + [False] * 2 + [True] * 2
    assert torch.isnan(scores[1]).tolist() == no_candidate == torch.isnan(scores[2]).tolist()
    assert image_states(trace, 0, 0).title(2) == "layer 5\nkept 0 · re-entered 2 · deferred 2 · removed 2"
    assert image_states(trace, 0, 1).title(0) == "layer 0\nkept 2 · re-entered 0 · deferred 0 · removed 2"
