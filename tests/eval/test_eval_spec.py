"""Method specs from lmms-eval's ``--model_args`` strings, the task YAMLs, and torch-free imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm_reroute.eval.tasks import (
    DATASETS,
    FAMILIES,
    TASK_DIR,
    all_task_names,
    refcoco,
    task_yaml,
    write_task_dir,
)
from vlm_reroute.methods.spec import MethodSpec, parse_list


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # lmms-eval leaves bracketed lists as strings and turns true/64 into bool/int
        (
            {"method": "pdrop", "reroute": True, "layers": "[2,7,15,23]", "keep": "[0.5,0.3,0.2,0.1]"},
            MethodSpec("pdrop", True, layers=(2, 7, 15, 23), keep=(0.5, 0.3, 0.2, 0.1)),
        ),
        ({"method": "fastv", "reroute": "false", "tier": 64}, MethodSpec("fastv", False, avg_t=64.0)),
        ({"method": "PDrop", "reroute": "true", "ratio": "0.111"}, MethodSpec("pdrop", True, ratio=0.111)),
        (
            {"method": "pdrop", "layers": "2;7", "keep": "100;50"},
            MethodSpec("pdrop", layers=(2, 7), keep=(100, 50)),
        ),
        ({"method": "vanilla"}, MethodSpec("none")),
        ({}, MethodSpec("none")),
    ],
)
def test_model_args_become_a_spec(args, expected):
    assert MethodSpec.from_args(**args) == expected


def test_keep_ints_stay_counts_and_floats_stay_fractions():
    assert parse_list("[64, 32]", "keep", integer=False) == (64, 32)
    assert all(isinstance(v, int) for v in parse_list("[64, 32]", "keep", integer=False))
    assert parse_list("[1.0, 0.5]", "keep", integer=False) == (1.0, 0.5)
    assert isinstance(parse_list("[1.0]", "keep", integer=False)[0], float)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"method": "fastvv", "tier": 64}, "allowed are none, fastv, pdrop"),
        ({"method": "none", "tier": 64}, "vanilla"),
        ({"method": "pdrop", "tier": 64, "keep": "[1]"}, "not both"),
        ({"method": "pdrop", "keep": "[64]"}, "without layers"),
        ({"method": "pdrop", "tier": 64, "ratio": 0.2}, "one budget"),
        ({"method": "pdrop", "layers": "[2,7", "keep": "[1,2]"}, "give a list"),
        ({"method": "pdrop", "layers": "[2.5]", "keep": "[1]"}, "not an integer"),
        ({"method": "pdrop", "reroute": "maybe", "tier": 64}, "give true or false"),
        ({"method": "pdrop", "tier": "lots"}, "give a number"),
        ({"method": "pdrop", "layers": "[2,7]", "keep": "[10,20]"}, "must not increase"),
    ],
)
def test_bad_model_args_name_the_value(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MethodSpec.from_args(**args)


def test_spec_round_trips_through_model_args():
    spec = MethodSpec("pdrop", True, layers=(2, 7, 15, 23), keep=(0.45, 0.45, 0.22, 0.11))
    items = re.split(r",(?![^\[]*\])", spec.model_args())  # commas inside brackets stay, as in lmms-eval
    parsed = dict(item.split("=", 1) for item in items)
    assert MethodSpec.from_args(**{k: v for k, v in parsed.items()}) == spec
    assert MethodSpec("fastv", True, avg_t=64.0).label == "FastV + Reroute @ avg_T 64"


def test_manifest_and_spec_import_neither_torch_nor_transformers():
    code = (
        "import sys; import vlm_reroute.eval.manifest, vlm_reroute.methods.spec, vlm_reroute.eval.parsers, "
        "vlm_reroute.eval.metrics, vlm_reroute.eval.grid, vlm_reroute.eval.tasks.refcoco, "
        "vlm_reroute.families; "
        "from vlm_reroute.methods.spec import MethodSpec; MethodSpec.from_args('pdrop', True, 64).build(); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


# ---------------------------------------------------------------------------------------- tasks
def test_shipped_yamls_are_the_generator_output(tmp_path):
    write_task_dir(tmp_path)
    shipped = {p.name: p.read_text() for p in TASK_DIR.glob("*.yaml")}
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    assert shipped == generated
    assert sorted(Path(n).stem for n in shipped) == sorted(all_task_names())
    assert len(shipped) == len(FAMILIES) * sum(len(splits) for _, splits in DATASETS.values()) == 81


def test_dataset_location_is_a_setting(tmp_path):
    hub = task_yaml("refcocog", "qwen2_5_vl", "val", "lmms-lab/RefCOCOg")
    assert "dataset_path: lmms-lab/RefCOCOg\n" in hub and "load_from_disk" not in hub
    local = task_yaml("refcoco", "llava", "testA", str(tmp_path))
    assert f"dataset_path: {tmp_path}\n" in local and "load_from_disk: true" in local
    with pytest.raises(ValueError, match="allowed keys are refcoco, refcoco\\+, refcocog"):
        write_task_dir(tmp_path, {"refcocoo": "x"})
    with pytest.raises(ValueError, match="split='testC' for refcoco"):
        task_yaml("refcoco", "llava", "testC")


def _doc(width: int, height: int, bbox_xywh: list[float]) -> dict:
    return {"image": Image.new("RGB", (width, height)), "bbox": bbox_xywh, "answer": ["the cat", "cat"]}


def test_preprocess_normalises_and_explodes_like_lmms_eval():
    Dataset = pytest.importorskip("datasets", reason="the eval extra (pip install -e '.[eval]')").Dataset

    dataset = Dataset.from_list([{**_doc(640, 480, [64, 48, 320, 240]), "question_id": "q1"}])
    rows = list(refcoco.preprocess_qwen(dataset))
    assert [r["answer"] for r in rows] == ["the cat", "cat"]
    assert rows[0]["bbox"] == pytest.approx([0.1, 0.1, 0.6, 0.6])
    # Qwen's smart_resize of 640 x 480 under 451584 pixels: multiples of 28, aspect kept
    assert (rows[0]["input_width"], rows[0]["input_height"]) == refcoco.qwen_input_size(640, 480)
    w, h = rows[0]["input_width"], rows[0]["input_height"]
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 451584
    assert refcoco.doc_to_visual_qwen(rows[0])[0].size == (w, h)


def test_qwen_input_size_matches_the_image_processor():
    from transformers import AutoImageProcessor, Qwen2VLImageProcessor  # noqa: F401

    processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=451584)
    for width, height in ((640, 480), (500, 333), (1024, 200), (90, 60)):
        w, h = refcoco.qwen_input_size(width, height)
        out = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
        t, gh, gw = out["image_grid_thw"][0].tolist()
        assert (gw * 14, gh * 14) == (w, h)


def test_process_results_score_a_correct_qwen2_5_vl_answer():
    doc = {"bbox": [0.1, 0.1, 0.6, 0.6], "input_width": 644, "input_height": 476, "answer": "cat"}
    x1, y1, x2, y2 = (round(0.1 * 644), round(0.1 * 476), round(0.6 * 644), round(0.6 * 476))
    answer = f'```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "cat"}}]\n```'
    record = refcoco.process_results_qwen2_5_vl(doc, [answer])["refcoco_ACC@0.5"]
    assert refcoco.aggregate_acc05([record]) == 1.0
    assert refcoco.aggregate_iou([record]) > 0.99
    miss = refcoco.process_results_qwen2_5_vl(doc, ["no idea"])["refcoco_IoU"]
    assert miss["pred"] is None
    assert refcoco.aggregate_acc05([record, miss]) == 0.5
    assert refcoco.aggregate_center([miss]) == 0.0


def test_llava_prompt_is_lmms_eval_s():
    utils_rec = pytest.importorskip("lmms_eval.tasks.refcoco.utils_rec")
    doc = {"answer": "the man on the left"}
    assert refcoco.doc_to_text_llava(doc) == utils_rec.refcoco_bbox_rec_doc_to_text(doc)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # the paper's (Nüwa / VScan) prompt, Qwen's wording in the Qwen3-VL fine-tuning README
        (
            "doc_to_text_qwen2_5_vl",
            "Locate the man on the left in this image and output the bbox coordinates in JSON format.",
        ),
        (
            "doc_to_text_qwen3_vl",
            "Locate the man on the left in this image and output the bbox coordinates in JSON format.",
        ),
        # InternVL's evaluate_grounding.py prompt
        (
            "doc_to_text_internvl",
            "Please provide the bounding box coordinate of the region this sentence describes: "
            "<ref>the man on the left</ref>",
        ),
    ],
)
def test_each_format_asks_in_its_own_words(function, expected):
    assert getattr(refcoco, function)({"answer": "the man on the left"}) == expected
