"""RefCOCO / RefCOCO+ / RefCOCOg grounding (REC) for each model family, as lmms-eval task functions.

The task YAMLs next to this module name these functions (``!function vlm_reroute.eval.tasks.refcoco.*``),
one set per grounding format (:data:`vlm_reroute.eval.parsers.FORMATS`; a family uses its format's
functions). Data preparation follows lmms-eval's ``refcoco_bbox_rec`` (ground truth ``[x, y, w, h]``
pixels → ``[x1, y1, x2, y2]`` normalised by the original image, one row per referring expression), plus
the size of the image the model sees:

* LLaVA-1.5 / NeXT / OneVision, Qwen3-VL / Qwen3.5, InternVL: the original image (their coordinates are
  relative to the whole image, so the model's own resizing or tiling does not change their meaning).
* Qwen2-VL / Qwen2.5-VL: the image resized by Qwen's own ``smart_resize`` (multiples of 28 pixels, at
  most ``max_pixels``; default 451584 = 576 visual tokens, the paper's setting) before it reaches the
  model, so the model's processor keeps that size and the box in pixels of that input (Qwen2.5-VL) maps
  back exactly. The model's own ``max_pixels`` must not be smaller.

Scores: :mod:`vlm_reroute.eval.metrics` (lmms-eval's definitions; an unparsable answer is a miss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..metrics import METRICS, mean, sample_scores
from ..parsers import FORMATS, LLAVA_PROMPT, QWEN2_VL_PROMPT, QWEN_JSON_PROMPT  # noqa: F401 (re-exported)

QWEN_MAX_PIXELS = 451584  # 576 merged tokens of 28 x 28 pixels
QWEN_MIN_PIXELS = 3136
QWEN_FACTOR = 28
QWEN2_5_VL_PROMPT = QWEN_JSON_PROMPT


def qwen_input_size(width: int, height: int, max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` that Qwen2-VL / Qwen2.5-VL processors make of a ``width × height`` one."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize,
    )  # no torchvision needed

    h, w = smart_resize(height, width, QWEN_FACTOR, min_pixels=QWEN_MIN_PIXELS, max_pixels=max_pixels)
    return int(w), int(h)


def make_preprocess(resize_for_qwen: bool, max_pixels: int = QWEN_MAX_PIXELS) -> Callable[[Any], Any]:
    """``process_docs``: normalised ground truth, one row per expression, and the model's input size."""

    def preprocess(dataset: Any) -> Any:
        from datasets import Dataset

        rows = []
        for doc in dataset:
            width, height = doc["image"].width, doc["image"].height
            x, y, w, h = doc["bbox"]
            input_w, input_h = (
                qwen_input_size(width, height, max_pixels) if resize_for_qwen else (width, height)
            )
            base = {k: v for k, v in doc.items() if k != "answer"}
            base.update(
                image_width=width,
                image_height=height,
                input_width=input_w,
                input_height=input_h,
                bbox=[x / width, y / height, (x + w) / width, (y + h) / height],
            )
            rows += [{**base, "answer": expression} for expression in doc["answer"]]
        return Dataset.from_list(rows)

    return preprocess


preprocess = make_preprocess(resize_for_qwen=False)
preprocess_llava = preprocess  # the name the first shipped YAMLs used
preprocess_qwen = make_preprocess(resize_for_qwen=True)


# ---------------------------------------------------------------------------------------- visuals, prompts
def doc_to_visual(doc: dict) -> list:
    """The original image (every family but Qwen2-VL / Qwen2.5-VL)."""
    return [doc["image"].convert("RGB")]


def doc_to_visual_qwen(doc: dict) -> list:
    """The image at the Qwen input size computed in ``process_docs`` (bicubic, as Qwen's processor)."""
    from PIL import Image

    image = doc["image"].convert("RGB")
    size = (doc["input_width"], doc["input_height"])
    return [image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)]


def _doc_to_text(name: str) -> Callable[[dict], str]:
    def doc_to_text(doc: dict) -> str:
        return FORMATS[name].prompt.format(expression=doc["answer"])

    doc_to_text.__name__ = f"doc_to_text_{name}"
    return doc_to_text


doc_to_text_llava = _doc_to_text("llava")
doc_to_text_qwen2_vl = _doc_to_text("qwen2_vl")
doc_to_text_qwen2_5_vl = _doc_to_text("qwen2_5_vl")
doc_to_text_qwen3_vl = _doc_to_text("qwen3_vl")
doc_to_text_internvl = _doc_to_text("internvl")


# ---------------------------------------------------------------------------------------- scoring
def _result(doc: dict, results: list[str], box: Any) -> dict[str, dict]:
    record = {
        "ann_id": doc.get("question_id"),
        "answer": doc["answer"],
        "bbox": list(doc["bbox"]),
        "pred": list(box) if box is not None else None,
        "raw": results[0] if results else "",
    }
    return {f"refcoco_{metric}": record for metric in METRICS}


def _process_results(name: str) -> Callable[[dict, list[str]], dict[str, dict]]:
    def process_results(doc: dict, results: list[str]) -> dict[str, dict]:
        text = results[0] if results else ""
        return _result(doc, results, FORMATS[name].parse(text, doc["input_width"], doc["input_height"]))

    process_results.__name__ = f"process_results_{name}"
    return process_results


process_results_llava = _process_results("llava")
process_results_qwen2_vl = _process_results("qwen2_vl")
process_results_qwen2_5_vl = _process_results("qwen2_5_vl")
process_results_qwen3_vl = _process_results("qwen3_vl")
process_results_internvl = _process_results("internvl")


def _aggregate(metric: str) -> Callable[[list[dict]], float]:
    def aggregate(results: list[dict]) -> float:
        return mean(sample_scores(r["bbox"], r["pred"])[metric] for r in results)

    aggregate.__name__ = f"aggregate_{metric}"
    return aggregate


aggregate_iou = _aggregate("IoU")
aggregate_acc01 = _aggregate("ACC@0.1")
aggregate_acc03 = _aggregate("ACC@0.3")
aggregate_acc05 = _aggregate("ACC@0.5")
aggregate_acc07 = _aggregate("ACC@0.7")
aggregate_acc09 = _aggregate("ACC@0.9")
aggregate_center = _aggregate("Center_ACC")
