"""Scoring the demo model on scenes: greedy answers through the project's pipeline, Acc@0.5, VQA accuracy.

Training's periodic evaluation and ``vlm-reroute demo`` share this code, so the numbers in the
training log are the ones the demo prints. Answers are generated with :class:`~vlm_reroute.Pipeline`
(the same prompt building, left padding and ``generate`` call as for any Hub checkpoint) and boxes
are read with the project's LLaVA parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..eval.parsers import parser_for
from ..eval.tasks.demo_scenes import BOX_FORMAT, grade_answer, grade_box
from ..loading import PromptBuilder
from ..pipelines import Answer, Pipeline

Box = tuple[float, float, float, float]


@dataclass
class Scored:
    """One scene's answer and whether it is right (``iou`` for grounding, ``None`` for VQA).

    A grounding answer is right at IoU ≥ 0.5 with the drawn box (Acc@0.5, the RefCOCO convention:
    Yu et al., arXiv 1608.00272), a VQA answer when it equals the answer (case and spaces aside).
    """

    family: str
    kind: str
    text: str
    correct: bool
    box: Box | None = None
    iou: float | None = None
    avg_visual_tokens: float = 0.0
    decisions: list[dict[str, int]] = field(default_factory=list)


def score(scene: dict[str, Any], answer: Answer) -> Scored:
    """Grade ``answer`` against ``scene`` (as :func:`vlm_reroute.demo.scenes` returns it)."""
    text = answer.text.strip()
    avg, decisions = answer.avg_visual_tokens, answer.decisions
    if scene["kind"] == "ground":
        width, height = scene["image"].size
        x1, y1, x2, y2 = scene["box"]
        gold = [x1 / width, y1 / height, x2 / width, y2 / height]
        overlap = grade_box(text, gold, width, height)["IoU"]
        box = parser_for(BOX_FORMAT)(text, width, height)
        return Scored(scene["family"], "ground", text, overlap >= 0.5, box, overlap, avg, decisions)
    correct = grade_answer(text, scene["answer"])
    return Scored(scene["family"], "vqa", text, correct, avg_visual_tokens=avg, decisions=decisions)


def demo_pipeline(model: Any, processor: Any, method: Any = None, max_new_tokens: int = 12) -> Pipeline:
    """A :class:`Pipeline` around an already loaded demo model and its processor."""
    processor.tokenizer.padding_side = "left"
    builder = PromptBuilder(processor=processor, tokenizer=processor.tokenizer)
    return Pipeline(model, builder, method, {"max_new_tokens": max_new_tokens})


def answer_scenes(
    pipe: Pipeline,
    items: Sequence[dict[str, Any]],
    method: Any = "default",
    batch_size: int = 20,
    progress=None,
) -> list[Scored]:
    """Greedy answers to ``items`` in batches, graded; ``progress(n)`` is called after each batch."""
    out: list[Scored] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        answers = pipe.batch([(s["image"], s["prompt"]) for s in chunk], method)
        out += [score(s, a) for s, a in zip(chunk, answers, strict=True)]
        if progress is not None:
            progress(len(chunk))
    return out


def accuracy(results: Sequence[Scored]) -> float:
    """Share of correct answers (0 for no results)."""
    return sum(r.correct for r in results) / len(results) if results else 0.0
