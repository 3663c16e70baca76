"""RefCOCO metrics with lmms-eval's definitions (``lmms_eval/tasks/refcoco/utils_rec.py``).

IoU of prediction and ground truth (both ``[x1, y1, x2, y2]`` normalised), Acc@t = fraction with
IoU ≥ t for t in 0.1, 0.3, 0.5, 0.7, 0.9, and centre accuracy = the prediction's centre lies inside the
ground-truth box (borders included). A missing prediction (``None``: no box could be parsed) scores 0
on every metric; lmms-eval instead substitutes ``[0, 0, 0, 0]``, whose centre can fall inside a box
touching the corner. Aggregates are means; an empty list gives NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Box = Sequence[float]

THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
METRICS = ("IoU", *(f"ACC@{t}" for t in THRESHOLDS), "Center_ACC")
PRIMARY = "ACC@0.5"


def iou(gt: Box, pred: Box | None) -> float:
    """Intersection over union (lmms-eval's ``compute_iou``); 0 for a missing or empty prediction."""
    if pred is None:
        return 0.0
    inter = max(0.0, min(gt[2], pred[2]) - max(gt[0], pred[0])) * max(
        0.0, min(gt[3], pred[3]) - max(gt[1], pred[1])
    )
    union = (gt[2] - gt[0]) * (gt[3] - gt[1]) + (pred[2] - pred[0]) * (pred[3] - pred[1]) - inter
    return inter / union if union > 0 else 0.0


def center_hit(gt: Box, pred: Box | None) -> bool:
    """The prediction's centre is inside the ground-truth box (lmms-eval's ``compute_center_accuracy``)."""
    if pred is None:
        return False
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]


def sample_scores(gt: Box, pred: Box | None) -> dict[str, float]:
    """Every metric of one sample (``METRICS`` keys)."""
    value = iou(gt, pred)
    scores = {"IoU": value}
    scores.update({f"ACC@{t}": float(value >= t) for t in THRESHOLDS})
    scores["Center_ACC"] = float(center_hit(gt, pred))
    return scores


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
