"""Training's periodic evaluation: held-out greedy accuracy, vanilla and under PDrop prune / reroute.

Measured on fixed held-out scenes (seed :data:`EVAL_SEED`, a different seed from the demo's
benchmark), so the curve shows whether the model degrades gracefully under reduction while it
learns, not only whether it learns. Nothing in training reads these numbers back.
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods import method_from_spec
from .evaluate import accuracy, answer_scenes, demo_pipeline
from .scenes import scenes

EVAL_SEED = 7001
#: (name, method, reroute, ratio) of the grounding configurations tracked during training
TRACKED = (
    ("vanilla", None, False, None),
    ("pdrop_prune_0.333", "pdrop", False, 0.333),
    ("pdrop_reroute_0.333", "pdrop", True, 0.333),
    ("pdrop_prune_0.111", "pdrop", False, 0.111),
    ("pdrop_reroute_0.111", "pdrop", True, 0.111),
)


def evaluate(model: Any, processor: Any, n_ground: int, n_vqa: int) -> dict[str, float]:
    """Accuracies keyed ``ground_<config>`` and ``vqa_vanilla`` (fractions)."""
    was_training = model.training
    model.eval()
    pipe = demo_pipeline(model, processor)
    ground = scenes(n_ground, seed=EVAL_SEED, kind="ground")
    result: dict[str, float] = {}
    with torch.no_grad():
        for name, method, reroute, ratio in TRACKED:
            chosen = None if method is None else method_from_spec(method, reroute=reroute, ratio=ratio)
            result[f"ground_{name}"] = accuracy(answer_scenes(pipe, ground, chosen))
        if n_vqa:
            vqa = scenes(n_vqa, seed=EVAL_SEED, kind="vqa")
            result["vqa_vanilla"] = accuracy(answer_scenes(pipe, vqa, None))
    model.train(was_training)
    return result
