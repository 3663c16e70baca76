"""Box parsers and RefCOCO metrics on realistic answers of each family, malformed ones included."""

from __future__ import annotations

import json
import math
import random

import pytest

from vlm_reroute.eval.metrics import METRICS, center_hit, iou, mean, sample_scores
from vlm_reroute.eval.parsers import (
    normalise,
    parse_llava,
    parse_qwen2_5_vl,
    parse_qwen2_vl,
    parser_for,
)


def close(box, expected, tol=1e-9):
    return box is not None and all(abs(a - b) <= tol for a, b in zip(box, expected, strict=True))


# ---------------------------------------------------------------- LLaVA-1.5: normalised floats in brackets
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.12, 0.34, 0.56, 0.78]", (0.12, 0.34, 0.56, 0.78)),
        ("[0.12,0.34,0.56,0.78]", (0.12, 0.34, 0.56, 0.78)),
        ("The man on the left: [0.0, 0.21, 0.47, 1.0].", (0.0, 0.21, 0.47, 1.0)),
        # two boxes: the first counts (lmms-eval's rule)
        ("[0.1, 0.1, 0.3, 0.3] and [0.5, 0.5, 0.9, 0.9]", (0.1, 0.1, 0.3, 0.3)),
        # slightly out of range: clipped to the image
        ("[-0.02, 0.10, 1.03, 0.95]", (0.0, 0.10, 1.0, 0.95)),
        ("[.25, .5, .75, 1]", (0.25, 0.5, 0.75, 1.0)),
    ],
)
def test_llava_boxes(text, expected):
    assert close(parse_llava(text), expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A man wearing a red shirt.",
        "[0.1, 0.2, 0.3]",  # three numbers
        "(0.1, 0.2, 0.3, 0.4)",  # not in brackets
        "[0.6, 0.2, 0.3, 0.4]",  # inverted: x2 < x1
        "[120, 40, 300, 400]",  # pixels, not normalised: clipped to an empty box
        "[0.5, 0.5, 0.5, 0.9]",  # zero width
        "[nan, 0.1, 0.2, 0.3]",
        "[1e999, 0.1, 0.2, 0.3]",
    ],
)
def test_llava_malformed_is_a_miss(text):
    assert parse_llava(text) is None


# ---------------------------------------------------------------- Qwen2.5-VL: JSON bbox_2d in resized pixels
QWEN25_FENCED = """```json
[
\t{"bbox_2d": [84, 140, 336, 588], "label": "the man in a red shirt"}
]
```"""


@pytest.mark.parametrize(
    ("text", "expected_pixels"),
    [
        (QWEN25_FENCED, (84, 140, 336, 588)),
        ('{"bbox_2d": [84, 140, 336, 588], "label": "cat"}', (84, 140, 336, 588)),
        # text around the JSON
        (
            'Sure! Here it is: [{"bbox_2d": [10, 20, 30, 40], "label": "dog"}] Hope this helps.',
            (10, 20, 30, 40),
        ),
        # two objects: the first
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}]', (1, 2, 3, 4)),
        # truncated JSON (max_new_tokens hit): the box is complete, the rest is not
        ('```json\n[\n\t{"bbox_2d": [12, 34, 56, 78], "label": "the bl', (12, 34, 56, 78)),
        # float pixels and single quotes
        ("[{'bbox_2d': [12.5, 34.0, 56.5, 78.0]}]", (12.5, 34.0, 56.5, 78.0)),
        # no key at all: a bare list, same units
        ("[84, 140, 336, 588]", (84, 140, 336, 588)),
        # beyond the right edge: clipped
        ('{"bbox_2d": [600, 100, 700, 200]}', (600, 100, 672, 200)),
    ],
)
def test_qwen2_5_vl_boxes(text, expected_pixels):
    w, h = 672, 644
    x1, y1, x2, y2 = expected_pixels
    assert close(parse_qwen2_5_vl(text, w, h), (x1 / w, y1 / h, x2 / w, y2 / h))


def test_qwen2_5_vl_resized_pixels_map_back_to_the_original_image():
    # original 1000 x 700 image resized by Qwen's smart_resize to 1008 x 700 (multiples of 28)
    original_w, original_h, input_w, input_h = 1000, 700, 1008, 700
    gt_original = (250.0, 70.0, 750.0, 630.0)  # pixels of the original image
    scale = (input_w / original_w, input_h / original_h) * 2
    pixels = [round(v * s) for v, s in zip(gt_original, scale, strict=True)]
    answer = json.dumps({"bbox_2d": pixels})
    box = parse_qwen2_5_vl(answer, input_w, input_h)
    expected = (0.25, 0.1, 0.75, 0.9)
    assert close(box, expected, tol=1 / input_w)


@pytest.mark.parametrize(
    "text",
    [
        "I cannot find it.",
        '{"bbox_2d": [1, 2, 3]}',
        '{"bbox_2d": "none"}',
        '{"bbox_2d": [300, 10, 100, 40]}',  # inverted
        '{"bbox_2d": [700, 10, 900, 40]}',  # entirely right of the image
        '{"bbox_2d": [-50, -40, -10, -5]}',  # entirely above-left
    ],
)
def test_qwen2_5_vl_malformed_is_a_miss(text):
    assert parse_qwen2_5_vl(text, 672, 644) is None


# ---------------------------------------------------------------- Qwen2-VL: (x1,y1),(x2,y2) in 0..1000
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "<|object_ref_start|>the man<|object_ref_end|><|box_start|>(120,340),(560,780)<|box_end|>",
            (0.12, 0.34, 0.56, 0.78),
        ),
        ("(120,340),(560,780)", (0.12, 0.34, 0.56, 0.78)),  # box tokens stripped by skip_special_tokens
        ("the man(120, 340), (560, 780)", (0.12, 0.34, 0.56, 0.78)),
        ("<|box_start|>(0,0),(999,999)<|box_end|>", (0.0, 0.0, 0.999, 0.999)),
        ("(1,2),(3,4) then (500,500),(900,900)", (0.001, 0.002, 0.003, 0.004)),
        ("(950,10),(1040,80)", (0.95, 0.01, 1.0, 0.08)),  # beyond 1000: clipped
    ],
)
def test_qwen2_vl_boxes(text, expected):
    assert close(parse_qwen2_vl(text), expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "There is no such object.",
        "<|box_start|>(120,340)<|box_end|>",  # one corner only
        "(560,780),(120,340)",  # inverted
        "[0.1, 0.2, 0.3, 0.4]",  # another family's format
        "<|box_start|>(1200,1300),(1500,1600)<|box_end|>",  # outside the image
    ],
)
def test_qwen2_vl_malformed_is_a_miss(text):
    assert parse_qwen2_vl(text) is None


def test_parser_for_reads_each_family_in_its_format():
    assert close(parser_for("qwen2_vl")("(120,340),(560,780)", 1, 1), (0.12, 0.34, 0.56, 0.78))
    assert close(parser_for("llava")("[0.1, 0.2, 0.3, 0.4]", 1, 1), (0.1, 0.2, 0.3, 0.4))
    assert close(parser_for("qwen2_5_vl")('{"bbox_2d": [10, 20, 30, 40]}', 100, 200), (0.1, 0.1, 0.3, 0.2))
    with pytest.raises(ValueError, match="allowed are llava, llava_next"):
        parser_for("llava_1.5")


@pytest.mark.parametrize("junk", [None, 123, "\x00\x01", "[" * 10000])
def test_no_input_crashes_a_parser(junk):
    text = junk if isinstance(junk, str) else None
    assert parse_llava(text) is None
    assert parse_qwen2_vl(text) is None
    assert parse_qwen2_5_vl(text, 10, 10) is None


def test_a_pair_after_thousands_of_open_parens_is_still_found():
    # Qwen2-VL's rule is "the first (x1,y1),(x2,y2) pair, anything may precede it" (as in
    # "the man(120, 340), (560, 780)"), so the pair at the end is the answer; the other formats
    # (square brackets) find nothing in it
    text = "(" * 5000 + "1,2),(3,4)"
    assert close(parse_qwen2_vl(text), (0.001, 0.002, 0.003, 0.004))
    assert parse_llava(text) is None
    assert parse_qwen2_5_vl(text, 10, 10) is None


def test_normalise_rejects_a_bad_image_size():
    with pytest.raises(ValueError, match="must be positive"):
        normalise((1, 2, 3, 4), 0, 10)


# ---------------------------------------------------------------- metrics
def test_iou_by_hand():
    gt = (0.0, 0.0, 0.5, 0.5)
    assert iou(gt, gt) == 1.0
    assert iou(gt, (0.5, 0.5, 1.0, 1.0)) == 0.0  # touching corners
    # half-overlapping: inter 0.25*0.5, union 2*0.25 - 0.125
    assert math.isclose(iou(gt, (0.25, 0.0, 0.75, 0.5)), 0.125 / 0.375)
    assert iou(gt, None) == 0.0


def test_sample_scores_thresholds_and_centre():
    gt = (0.0, 0.0, 0.5, 0.5)
    scores = sample_scores(gt, (0.25, 0.0, 0.75, 0.5))  # IoU 1/3, centre (0.5, 0.25) on the border
    assert set(scores) == set(METRICS)
    assert [scores[f"ACC@{t}"] for t in (0.1, 0.3, 0.5, 0.7, 0.9)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert scores["Center_ACC"] == 1.0
    assert center_hit(gt, (0.6, 0.6, 0.9, 0.9)) is False
    miss = sample_scores(gt, None)
    assert all(v == 0.0 for v in miss.values())


def test_mean_of_nothing_is_nan():
    assert math.isnan(mean([]))
    assert mean([1.0, 0.0]) == 0.5


def test_metrics_equal_lmms_eval_definitions():
    utils_rec = pytest.importorskip("lmms_eval.tasks.refcoco.utils_rec")
    rng = random.Random(0)
    for _ in range(500):
        x1, x2 = sorted(rng.random() for _ in range(2))
        y1, y2 = sorted(rng.random() for _ in range(2))
        a1, a2 = sorted(rng.random() for _ in range(2))
        b1, b2 = sorted(rng.random() for _ in range(2))
        gt, pred = [x1, y1, x2, y2], [a1, b1, a2, b2]
        assert math.isclose(iou(gt, pred), utils_rec.compute_iou(gt, pred), abs_tol=1e-12)
        assert center_hit(gt, pred) == utils_rec.compute_center_accuracy(gt, pred)
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            assert sample_scores(gt, pred)[f"ACC@{t}"] == float(utils_rec.compute_accuracy(gt, pred, t))
