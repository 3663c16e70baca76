"""The demo benchmark: vanilla and each method, prune and reroute, on held-out scenes.

Every configuration answers the same scenes (``scenes(n, seed=DEMO_SEED, ...)``) greedily
through the project's pipeline; grounding is scored as Acc@0.5 with the project's LLaVA parser, VQA
as exact match. Costs come from each batch's trace with the evaluation code's conventions
(:func:`vlm_reroute.eval.cost.sample_costs`: avg_T, theoretical TFLOPs, KV bytes) and the prefill
time from its timer. Accuracies carry 95 % Wilson intervals: a few hundred scenes leave several
points of uncertainty, and a difference between prune and reroute means something only beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..eval.cost import PrefillTimer, model_shape, sample_costs, summarise
from ..methods import method_from_spec
from .evaluate import Scored, score
from .scenes import GROUND_FAMILIES, scenes

#: held-out seed of the benchmark (training's periodic evaluation uses another, 7001)
DEMO_SEED = 2025
#: methods compared, each as prune and as reroute
METHODS = ("fastv", "pdrop", "nuwa")


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sensible at 0 %, 100 % and small ``total``)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Cell:
    """One accuracy with its 95 % Wilson score interval (Wilson, JASA 1927; :func:`wilson`).

    The interval is carried because a few hundred scenes leave several points of uncertainty: a
    difference between prune and reroute means something only beyond it.
    """

    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def to_dict(self) -> dict[str, Any]:
        low, high = wilson(self.correct, self.total)
        return {"acc": self.value, "ci95": [low, high], "correct": self.correct, "n": self.total}


@dataclass
class ConfigResult:
    """Everything one configuration produced: graded answers and mean costs.

    Grounding is scored as Acc@0.5 (IoU ≥ 0.5, the RefCOCO convention: Yu et al., arXiv 1608.00272),
    VQA as exact match; ``costs`` are per-sample records of :func:`vlm_reroute.eval.cost.sample_costs`.
    """

    name: str
    method: str
    reroute: bool | None
    ground: list[Scored] = field(default_factory=list)
    vqa: list[Scored] = field(default_factory=list)
    costs: list[dict[str, Any]] = field(default_factory=list)

    def cells(self) -> dict[str, Cell]:
        """Acc@0.5 per expression family and overall, and VQA accuracy."""
        out = {f: Cell(*_count([r for r in self.ground if r.family == f])) for f in GROUND_FAMILIES}
        out["ground"] = Cell(*_count(self.ground))
        out["vqa"] = Cell(*_count(self.vqa))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "reroute": self.reroute,
            "accuracy": {k: c.to_dict() for k, c in self.cells().items()},
            "cost": summarise(self.costs),
            "answers": [asdict(r) for r in [*self.ground, *self.vqa]],
        }


def _count(results: Sequence[Scored]) -> tuple[int, int]:
    return sum(r.correct for r in results), len(results)


def configurations(model: Any, spec: dict[str, Any], strict: bool, methods: Sequence[str] = METHODS) -> list:
    """``(name, method key, reroute, method object)`` for vanilla and each method in both modes."""
    out: list[tuple[str, str, bool | None, Any]] = [("vanilla", "vanilla", None, None)]
    for key in methods:
        for reroute in (False, True):
            chosen = method_from_spec(key, reroute=reroute, strict=strict, model=model, **spec)
            out.append((chosen.name, key, reroute, chosen))
    return out


#: the control row: vanilla with every image replaced by a uniform grey one (issue 17: "the
#: benchmark needs the image" — grounding on blank images must stay near chance)
BLANK = ("vanilla, blank image", "blank", None, None)


def blanked(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` with each image replaced by a uniform mid-grey image of the same size."""
    from PIL import Image

    return [{**s, "image": Image.new("RGB", s["image"].size, (128, 128, 128))} for s in items]


def held_out(n_ground: int, n_vqa: int, seed: int = DEMO_SEED) -> tuple[list[dict], list[dict]]:
    """The benchmark's scenes (generated once, shared by every configuration)."""
    return scenes(n_ground, seed=seed, kind="ground"), scenes(n_vqa, seed=seed, kind="vqa")


def run_config(
    pipe: Any,
    config: tuple[str, str, bool | None, Any],
    items: Sequence[dict[str, Any]],
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> ConfigResult:
    """Answer ``items`` under one configuration, in batches, recording costs and traces."""
    name, key, reroute, method = config
    result = ConfigResult(name, key, reroute)
    shape = model_shape(pipe.model)
    timer = PrefillTimer(pipe.model)
    image_token = int(pipe.model.config.image_token_id)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = pipe.inputs([(s["image"], s["prompt"]) for s in chunk])
        with torch.no_grad(), timer():
            answers = pipe.generate(inputs, method)
        trace = answers[0].trace
        costs = sample_costs(
            shape, name, inputs["input_ids"], inputs["attention_mask"], image_token, trace, timer.ms or 0.0,
            (None, "none"),
        )  # fmt: skip
        result.costs += [c.to_dict() for c in costs]
        for s, a in zip(chunk, answers, strict=True):
            (result.ground if s["kind"] == "ground" else result.vqa).append(score(s, a))
        if advance is not None:
            advance(len(chunk))
    return result
