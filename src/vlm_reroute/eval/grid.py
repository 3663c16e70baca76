"""The grid behind ``vlm-reroute eval``: methods × reroute on/off × tiers × tasks through lmms-eval.

One model is loaded once and every cell re-applies a method to it (``VlmReroute.set_method``), so a cell
costs only its answers. Each finished cell is appended to ``results.json`` at once, so an interrupted
run resumes where it stopped (finished cells are skipped); ``grid.json`` records the settings a folder
belongs to and refuses to mix runs. Each cell also keeps lmms-eval's scores and the per-sample answers
and costs under ``cells/``.

``results.json`` holds one object per cell with exactly: ``task``, ``method``, ``reroute``, ``tier``,
``metric``, ``value``, ``avg_visual_tokens``, ``tflops``, ``kv_bytes``, ``prefill_ms``, ``n``
(costs are means over the cell's samples, see :mod:`.cost`).
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..methods.spec import VANILLA, MethodSpec
from .failures import EvalFailed, describe_exception, unknown_tasks
from .parallel import group_up

FIELDS = (
    "task",
    "method",
    "reroute",
    "tier",
    "metric",
    "value",
    "avg_visual_tokens",
    "tflops",
    "kv_bytes",
    "prefill_ms",
    "n",
)
# primary metric per task (prefix match, longest first); other tasks: their first reported metric
PRIMARY_METRICS = {
    "refcoco": "refcoco_ACC@0.5",
    "pope": "pope_accuracy",
    "gqa": "exact_match",
    "mme": "mme_perception_score",
    "mmbench": "gpt_eval_score",
    "vlm_reroute_demo_ground": "demo_ACC@0.5",  # the demo's scenes (eval/tasks/demo_scenes.py)
    "vlm_reroute_demo_vqa": "demo_accuracy",
}


@dataclass(frozen=True)
class Cell:
    """One grid cell: a task, a method, prune or reroute, an avg_T tier.

    ``method="vanilla"`` (no reroute, no tier) is the baseline of its task. ``tier`` is avg_T, the
    mean visual tokens per decoder layer; the 192 / 128 / 64 tiers are those of the published tables
    (SparseVLM, arXiv 2410.04417; PyramidDrop, arXiv 2410.17247; docs/budgets.md). ``layers``:
    decision layers the tier is solved on (the method's defaults when ``None``); one choice per grid
    (recorded in its settings), so it is not part of the cell's key.
    """

    task: str
    method: str
    reroute: bool
    tier: float | None
    layers: tuple[int, ...] | None = None

    @property
    def key(self) -> tuple:
        return (self.task, self.method, self.reroute, self.tier)

    @property
    def slug(self) -> str:
        tier = "-" if self.tier is None else f"{self.tier:g}"
        mode = "reroute" if self.reroute else "prune"
        return f"{self.task}__{self.method}__{mode}__{tier}".replace("/", "_")

    def spec(self) -> MethodSpec:
        if self.method == "vanilla":
            return MethodSpec(VANILLA)
        return MethodSpec(self.method, reroute=self.reroute, avg_t=self.tier, layers=self.layers)


def plan(
    tasks: Sequence[str],
    methods: Sequence[str],
    reroute: Sequence[bool],
    tiers: Sequence[float],
    layers: Sequence[int] | None = None,
) -> list[Cell]:
    """Vanilla for each task, then every method × reroute mode × tier (on ``layers``), task by task."""
    if not tasks:
        raise ValueError("give at least one task")
    cells = []
    for task in tasks:
        cells.append(Cell(task, "vanilla", False, None))
        for method in methods:
            for mode in reroute:
                for tier in tiers:
                    cell = Cell(task, method, mode, float(tier), tuple(layers) if layers else None)
                    cell.spec()  # fail early on a bad method name or tier
                    cells.append(cell)
    return cells


def primary_metric(task: str, results: dict[str, Any]) -> tuple[str, float]:
    """The headline metric of ``task`` in lmms-eval's results for it (``{"metric,filter": value}``)."""
    values = {k.split(",")[0]: v for k, v in results.items() if "," in k and "stderr" not in k}
    values = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for prefix in sorted(PRIMARY_METRICS, key=len, reverse=True):
        if task.startswith(prefix) and PRIMARY_METRICS[prefix] in values:
            return PRIMARY_METRICS[prefix], float(values[PRIMARY_METRICS[prefix]])
    if not values:
        raise ValueError(f"lmms-eval reported no numeric metric for {task}: {sorted(results)}")
    name = next(iter(values))
    return name, float(values[name])


def load_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / "grid.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds results of a run with other settings ({', '.join(changed)}); "
                "resume with the same settings or choose another output folder"
            )
    else:
        _write_json(path, settings)


def run_grid(
    cells: Iterable[Cell],
    out: str | Path,
    model_factory: Callable[[], Any],
    settings: dict[str, Any],
    limit: int | float | None = None,
    include_path: Sequence[str | Path] = (),
    progress: Callable[[Cell, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out/results.json``; return all rows (finished before and now).

    An unknown task name is a ``ValueError`` before the model loads; a cell lmms-eval returns no
    results for is an :class:`~vlm_reroute.eval.failures.EvalFailed` (finished cells stay saved).
    Under data parallelism (:mod:`.parallel`) every rank runs the same pending cells; rank 0 writes only
    after lmms-eval gathered a cell from every rank, so no rank can read a results file ahead of another.

    ``model_factory()`` builds the lmms-eval model (a :class:`~vlm_reroute.eval.model.VlmReroute`),
    called once and only if a cell is left to run. ``settings`` (JSON-able: checkpoint, limit, model
    arguments) identify the run; a folder holding another run's results is refused.
    """
    from .parallel import world

    out = Path(out)
    if world()[0] == 0:  # under data parallelism rank 0 alone writes (the others read the same results)
        (out / "cells").mkdir(parents=True, exist_ok=True)
        _check_settings(out, {**settings, "limit": limit})
    results_path = out / "results.json"
    rows = load_results(results_path)
    done = {(r["task"], r["method"], r["reroute"], r["tier"]) for r in rows}
    pending = [c for c in cells if c.key not in done]
    if not pending:
        return rows

    manager = task_manager({c.task for c in pending}, include_path)  # before the model: fail fast
    model = model_factory()
    model.reusable = True
    for i, cell in enumerate(pending):
        if progress is not None:
            progress(cell, i, len(pending))
        model.set_method(cell.spec())
        output = evaluate_cell(model, cell, limit, manager)
        if output is None:  # a non-zero rank under data parallelism: rank 0 writes
            continue
        row = cell_row(cell, output)
        samples = output["samples"][cell.task]
        _write_json(
            out / "cells" / f"{cell.slug}.json",
            {
                "cell": asdict(cell),
                "results": output["results"][cell.task],
                "samples": [{"doc_id": s["doc_id"], "resps": s["resps"], "cost": _cost(s)} for s in samples],
            },
        )
        rows.append(row)
        _write_json(results_path, rows)
    return rows


def task_manager(tasks: set[str], include_path: Sequence[str | Path]) -> Any:
    """lmms-eval's task index holding ``tasks``; ``ValueError`` (one line) names the unknown ones.

    Our folders alone are indexed first (lmms-eval's ~2000 tasks take seconds), all tasks if needed.
    """
    from lmms_eval.tasks import TaskManager

    paths = [str(p) for p in include_path] or None
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not tasks <= set(manager.all_tasks):  # lmms-eval's own tasks are needed
        manager = TaskManager(include_path=paths, include_defaults=True)
    missing = sorted(tasks - set(manager.all_tasks))
    if missing:
        raise ValueError(unknown_tasks(missing, manager.all_tasks))
    return manager


def evaluate_cell(model: Any, cell: Cell, limit: int | float | None, manager: Any) -> dict[str, Any] | None:
    """lmms-eval's output for one cell (``None`` on a non-zero rank); :class:`EvalFailed` if it has none.

    lmms-eval's failures (an import that breaks, a dataset that cannot load, a model error) become one
    line naming the cell, the error and where it was raised; the exception stays chained as the cause.
    """
    from lmms_eval.evaluator import simple_evaluate

    where = f"{cell.task}, {cell.spec().label}"
    # as lmms-eval's own command line: a process group started by the launcher means its torchrun path
    distributed = group_up()
    try:
        output = simple_evaluate(
            model=model,
            tasks=[cell.task],
            limit=limit,
            log_samples=True,
            task_manager=manager,
            distributed_executor_backend="torchrun" if distributed else "accelerate",
        )
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" (at {'/'.join(Path(frames[-1].filename).parts[-2:])}:{frames[-1].lineno})" if frames else ""
        raise EvalFailed(f"{where}: lmms-eval failed: {describe_exception(exc)}{at}") from exc
    if output is None and getattr(model, "rank", 0) != 0:
        return None
    if (
        not output
        or cell.task not in output.get("results", {})
        or not output.get("samples", {}).get(cell.task)
    ):
        raise EvalFailed(f"{where}: lmms-eval returned no results for {cell.task}")
    return output


def _cost(sample: dict[str, Any]) -> dict[str, Any] | None:
    counts = sample.get("token_counts") or [None]
    return (counts[0] or {}).get("vlm_reroute")


def cell_row(cell: Cell, output: dict[str, Any]) -> dict[str, Any]:
    """One ``results.json`` object from lmms-eval's output for the cell."""
    from .cost import summarise

    metric, value = primary_metric(cell.task, output["results"][cell.task])
    samples = output["samples"][cell.task]
    costs = [c for c in (_cost(s) for s in samples) if c is not None]
    if len(costs) != len(samples):
        raise ValueError(f"{cell.slug}: {len(samples) - len(costs)} samples carry no cost record")
    summary = summarise(costs)
    row = {
        "task": cell.task,
        "method": cell.method,
        "reroute": cell.reroute,
        "tier": cell.tier,
        "metric": metric,
        "value": value,
        "avg_visual_tokens": summary["avg_visual_tokens"],
        "tflops": summary["tflops"],
        "kv_bytes": summary["kv_bytes"],
        "prefill_ms": summary["prefill_ms"],
        "n": len(samples),
    }
    assert tuple(row) == FIELDS
    return row
