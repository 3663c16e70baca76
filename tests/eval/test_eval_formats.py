"""Grounding formats of every family: the family table, each family's parser on real answer shapes,
truncated and malformed answers, and pixel boxes of images of odd sizes.

Answer shapes and their sources (cited in ``vlm_reroute/eval/parsers.py``):

* LLaVA-1.5 / NeXT / OneVision: ``[x1, y1, x2, y2]`` floats in [0, 1] (lmms-eval ``utils_rec.py``).
* Qwen3-VL / Qwen3.5: ``[{"bbox_2d": [...], "label": ...}]`` in a ```` ```json ```` fence, 0–1000 (Qwen3-VL
  cookbook ``2d_grounding.ipynb``: ``parse_json`` strips the fence, ``bbox_2d[0] / 1000 * width``); the
  fine-tuning README's ``{"bbox_2d": [135, 114, 1016, 672]}``.
* InternVL: ``<ref>…</ref><box>[[x1, y1, x2, y2]]</box>`` on 0–1000 (``evaluate_grounding.py``).
"""

from __future__ import annotations

import pytest

from vlm_reroute.adapters import ADAPTERS
from vlm_reroute.eval.parsers import (
    FORMATS,
    NoGroundingFormat,
    format_for,
    parse_internvl,
    parse_qwen2_5_vl,
    parse_qwen3_vl,
    parser_for,
)
from vlm_reroute.eval.tasks import refcoco
from vlm_reroute.families import FAMILIES, family_names, family_of_class, get_family, grounding_families

ADAPTER_FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_5",
    "internvl",
    "idefics3",
    "smolvlm",
)


def close(box, expected, tol=1e-9):
    return box is not None and all(abs(a - b) <= tol for a, b in zip(box, expected, strict=True))


# ---------------------------------------------------------------- the family table
def test_the_table_names_every_adapter_family_and_class():
    assert family_names() == ADAPTER_FAMILIES
    by_adapter = {a.__name__: set(a.model_classes) for a in ADAPTERS}
    for family in FAMILIES:
        assert family.model_class in by_adapter[family.adapter], family.name
        assert family_of_class(family.model_class) is family
    assert {c for classes in by_adapter.values() for c in classes} == {f.model_class for f in FAMILIES}


def test_grounding_families_are_all_but_idefics3_and_smolvlm():
    assert set(grounding_families()) == set(ADAPTER_FAMILIES) - {"idefics3", "smolvlm"}
    for name in grounding_families():
        assert format_for(name) is FORMATS[get_family(name).grounding]


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_a_family_without_a_format_is_one_clear_error(family):
    with pytest.raises(NoGroundingFormat, match=f"family='{family}' has no documented grounding format"):
        parser_for(family)


def test_an_unknown_family_names_the_known_ones():
    with pytest.raises(ValueError, match="allowed are llava, llava_next, .*, smolvlm") as info:
        parser_for("blip2")
    assert not isinstance(info.value, NoGroundingFormat)


# ---------------------------------------------------------------- one reading per family
# the same answer text, read by each family's own rule (0-1000 grid, [0, 1], or pixels of a 500x400 input)
SAME_TEXT = '{"bbox_2d": [100, 200, 300, 400]}'


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("qwen3_vl", (0.1, 0.2, 0.3, 0.4)),
        ("qwen3_vl_moe", (0.1, 0.2, 0.3, 0.4)),
        ("qwen3_5", (0.1, 0.2, 0.3, 0.4)),
        ("qwen2_5_vl", (0.2, 0.5, 0.6, 1.0)),  # pixels of the 500 x 400 input
        ("internvl", (0.1, 0.2, 0.3, 0.4)),  # its list read on 0-1000
        ("llava_next", None),  # [0, 1] floats: 100..400 clip to an empty box, not rescaled
        ("llava_onevision", None),
        ("qwen2_vl", None),  # needs (x1,y1),(x2,y2)
    ],
)
def test_each_family_reads_the_same_text_its_own_way(family, expected):
    box = parser_for(family)(SAME_TEXT, 500, 400)
    assert box is None if expected is None else close(box, expected)


def test_a_normalised_looking_answer_stays_on_the_family_grid():
    """Values below 1 under a 0-1000 format are a (tiny) box on that grid, never re-read as [0, 1]."""
    assert close(parse_qwen3_vl("[0.1, 0.2, 0.3, 0.4]"), (1e-4, 2e-4, 3e-4, 4e-4))
    assert close(parse_internvl("<box>[[0.1, 0.2, 0.3, 0.4]]</box>"), (1e-4, 2e-4, 3e-4, 4e-4))


# ---------------------------------------------------------------- Qwen3-VL / Qwen3.5: 0-1000 JSON or list
QWEN3_FENCED = '```json\n[\n\t{"bbox_2d": [120, 340, 560, 780], "label": "the red square"}\n]\n```'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (QWEN3_FENCED, (0.12, 0.34, 0.56, 0.78)),
        ('{"bbox_2d": [120, 340, 560, 780], "label": "cat"}', (0.12, 0.34, 0.56, 0.78)),
        ("[120, 340, 560, 780]", (0.12, 0.34, 0.56, 0.78)),  # the bare list
        ("The box is [120, 340, 560, 780].", (0.12, 0.34, 0.56, 0.78)),
        # the fine-tuning README's example answer: read on 0-1000, 1016 clipped to the edge
        ('{\n"bbox_2d": [135, 114, 1016, 672]\n}', (0.135, 0.114, 1.0, 0.672)),
        # two objects: the first; truncated after the first box: the first is complete
        ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]', (0.001, 0.002, 0.003, 0.004)),
        ('```json\n[\n\t{"bbox_2d": [10, 20, 30, 40], "label": "the bl', (0.01, 0.02, 0.03, 0.04)),
        ("[{'bbox_2d': [100.5, 200, 300, 400.5]}]", (0.1005, 0.2, 0.3, 0.4005)),
    ],
)
def test_qwen3_vl_boxes(text, expected):
    for family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5"):
        assert close(parser_for(family)(text, 17, 23), expected, tol=1e-12)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I cannot find it.",
        '```json\n[\n\t{"bbox_2d": [120, 340, 5',  # truncated inside the box
        '{"bbox_2d": [120, 340, 560]}',
        '{"bbox_2d": "none"}',
        '{"bbox_2d": [560, 340, 120, 780]}',  # inverted
        '{"bbox_2d": [1200, 10, 1500, 40]}',  # beyond the grid
        "(120,340),(560,780)",  # Qwen2-VL's format
        "[nan, 1, 2, 3]",
    ],
)
def test_qwen3_vl_malformed_is_a_miss(text):
    assert parse_qwen3_vl(text) is None


# ---------------------------------------------------------------- InternVL: <box>[[...]]</box> on 0-1000
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<ref>the man</ref><box>[[120, 340, 560, 780]]</box>", (0.12, 0.34, 0.56, 0.78)),
        ("the man[[120, 340, 560, 780]]", (0.12, 0.34, 0.56, 0.78)),  # special tokens stripped
        ("<box>[[120,340,560,780]]</box>", (0.12, 0.34, 0.56, 0.78)),
        ("[120, 340, 560, 780]", (0.12, 0.34, 0.56, 0.78)),  # single brackets, as its own regex reads
        ("<box>[[1, 2, 3, 4], [500, 500, 900, 900]]</box>", (0.001, 0.002, 0.003, 0.004)),
        ("<box>[[0, 0, 1000, 1000]]</box>", (0.0, 0.0, 1.0, 1.0)),
        ("<box>[[950, 10, 1040, 80]]</box>", (0.95, 0.01, 1.0, 0.08)),
    ],
)
def test_internvl_boxes(text, expected):
    assert close(parser_for("internvl")(text, 640, 480), expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<ref>the man</ref>",
        "<ref>the man</ref><box>[[120, 340, 560",  # truncated
        "<box>[[120, 340, 560]]</box>",
        "<box>[[560, 340, 120, 780]]</box>",  # inverted
        "<box>[[1100, 1100, 1200, 1200]]</box>",
        "(120,340),(560,780)",
    ],
)
def test_internvl_malformed_is_a_miss(text):
    assert parse_internvl(text) is None


@pytest.mark.parametrize("junk", [None, 123, "\x00", "[" * 10000, "{" * 5000 + '"bbox_2d": [1,2,3'])
@pytest.mark.parametrize("family", grounding_families())
def test_no_input_crashes_any_family_parser(family, junk):
    text = junk if isinstance(junk, str) else None
    assert parser_for(family)(text, 10, 10) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------- pixel boxes of odd-sized images
@pytest.mark.parametrize("size", [(333, 517), (641, 479), (29, 1000), (1001, 57), (3000, 2001)])
def test_qwen2_5_vl_pixels_of_the_resized_input_map_back_for_odd_sizes(size):
    """The task resizes with smart_resize (multiples of 28); a box in those pixels maps to the original."""
    width, height = size
    input_w, input_h = refcoco.qwen_input_size(width, height)
    assert input_w % 28 == 0 and input_h % 28 == 0 and input_w * input_h <= refcoco.QWEN_MAX_PIXELS
    truth = (0.2, 0.3, 0.7, 0.9)  # normalised box in the original image
    pixels = [round(v * s) for v, s in zip(truth, (input_w, input_h) * 2, strict=True)]
    box = parse_qwen2_5_vl(f'{{"bbox_2d": {pixels}}}', input_w, input_h)
    assert close(box, truth, tol=0.5 / min(input_w, input_h) + 1e-12)
    if max(abs(input_w / width - 1), abs(input_h / height - 1)) > 0.05:  # the trap: ÷ the original size
        wrong = parse_qwen2_5_vl(f'{{"bbox_2d": {pixels}}}', width, height)
        assert wrong is None or not close(wrong, truth, tol=0.5 / min(input_w, input_h))


def test_qwen2_5_vl_task_reads_pixels_of_the_image_it_hands_the_model():
    """process_docs records the resized size, doc_to_visual hands that image, the parser divides by it."""
    import datasets
    from PIL import Image

    image = Image.new("RGB", (333, 517), "white")
    rows = datasets.Dataset.from_list(
        [{"question_id": "0", "image": image, "answer": ["the thing"], "bbox": [33.3, 51.7, 166.5, 310.2]}]
    )
    (doc,) = list(refcoco.preprocess_qwen(rows))
    (seen,) = refcoco.doc_to_visual_qwen(doc)
    assert seen.size == (doc["input_width"], doc["input_height"]) == refcoco.qwen_input_size(333, 517)
    w, h = seen.size
    answer = f'{{"bbox_2d": [{0.1 * w:.1f}, {0.1 * h:.1f}, {0.6 * w:.1f}, {0.7 * h:.1f}]}}'
    record = refcoco.process_results_qwen2_5_vl(doc, [answer])["refcoco_ACC@0.5"]
    assert close(record["pred"], (0.1, 0.1, 0.6, 0.7), tol=0.1 / min(w, h))
    assert close(record["bbox"], (0.1, 0.1, 0.6, 0.7), tol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "llava_onevision"])
def test_relative_formats_keep_the_original_image(family):
    """0-1000 and [0, 1] families get the original image: their grid is relative to the whole image."""
    from vlm_reroute.eval.tasks import task_yaml

    text = task_yaml("refcoco", family, "val")
    assert "refcoco.preprocess\n" in text and "refcoco.doc_to_visual\n" in text
    assert f"doc_to_text_{get_family(family).grounding}" in text
