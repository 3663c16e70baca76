"""The paper-style table (Markdown and CSV) and the accuracy-vs-avg_T chart of a grid's ``results.json``.

Rows are method and tier (vanilla first), columns are tasks: the absolute score (in % when the metric
is a fraction) and its retention, the score as a percentage of vanilla's on the same task. When the
grid holds RefCOCO grounding splits, the paper's summary column follows: the **average ratio**, the
mean over those splits of score ÷ vanilla score (in %; splits where vanilla scored 0 are left out, and
the cell is empty when none is left). The last columns are the measured avg_T and TFLOPs averaged over
the row's tasks.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .presets import is_grounding_task

_DISPLAY = {"vanilla": "vanilla", "fastv": "FastV", "pdrop": "PDrop", "random": "Random"}


def _name(method: str, reroute: bool) -> str:
    return _DISPLAY.get(method, method) + (" + Reroute" if reroute else "")


def _rows(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[tuple], dict]:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    keys = list(dict.fromkeys((r["method"], r["reroute"], r["tier"]) for r in results))
    keys.sort(key=lambda k: (k[0] != "vanilla", -(k[2] or 0), k[0], k[1]))
    cell = {(r["task"], r["method"], r["reroute"], r["tier"]): r for r in results}
    return tasks, keys, cell


def _fraction_tasks(results: Sequence[dict[str, Any]]) -> set[str]:
    by_task: dict[str, list[float]] = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r["value"])
    return {t for t, v in by_task.items() if all(0.0 <= x <= 1.0 for x in v)}


def average_ratio(results: Sequence[dict[str, Any]], method: str, reroute: bool, tier: Any) -> float | None:
    """Mean over the grounding splits of this row's score ÷ vanilla's, in % (``None``: no split counts)."""
    by_key = {(r["task"], r["method"], r["reroute"], r["tier"]): r for r in results}
    vanilla = {r["task"]: r["value"] for r in results if r["method"] == "vanilla"}
    ratios = [
        row["value"] / vanilla[task]
        for (task, *key), row in by_key.items()
        if tuple(key) == (method, reroute, tier) and is_grounding_task(task) and vanilla.get(task)
    ]
    return 100.0 * sum(ratios) / len(ratios) if ratios else None


def table_rows(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (numbers, ``None`` where a cell is missing) of the table: per task the score and its
    retention, then ``average ratio %`` (when grounding splits are present), avg_T and TFLOPs."""
    tasks, keys, cell = _rows(results)
    percent = _fraction_tasks(results)
    grounding = any(is_grounding_task(t) for t in tasks)
    header = ["method", "tier"]
    for task in tasks:
        header += [f"{task} ({cell_metric(results, task)})", f"{task} retention %"]
    header += [*(["average ratio %"] if grounding else []), "avg_T", "TFLOPs"]
    rows = []
    for method, reroute, tier in keys:
        row: list[Any] = [_name(method, reroute), tier]
        measured = []
        for task in tasks:
            r = cell.get((task, method, reroute, tier))
            base = next((v for k, v in cell.items() if k[0] == task and k[1] == "vanilla"), None)
            if r is None:
                row += [None, None]
                continue
            scale = 100.0 if task in percent else 1.0
            retention = 100.0 * r["value"] / base["value"] if base and base["value"] else None
            row += [r["value"] * scale, retention]
            measured.append(r)
        if grounding:
            row.append(average_ratio(results, method, reroute, tier))
        row.append(sum(r["avg_visual_tokens"] for r in measured) / len(measured) if measured else None)
        row.append(sum(r["tflops"] for r in measured) / len(measured) if measured else None)
        rows.append(row)
    return header, rows


def cell_metric(results: Sequence[dict[str, Any]], task: str) -> str:
    return next(r["metric"] for r in results if r["task"] == task)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown(results: Sequence[dict[str, Any]], title: str = "") -> str:
    header, rows = table_rows(results)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    ratio = "average ratio %" in header
    head = ["method", "tier", *tasks, *(["avg ratio"] if ratio else []), "avg_T", "TFLOPs"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        scores = [
            f"{_fmt(row[2 + 2 * i])} ({_fmt(row[3 + 2 * i])}%)" if row[2 + 2 * i] is not None else "–"
            for i in range(len(tasks))
        ]
        tier = "–" if row[1] is None else f"{row[1]:g}"
        extra = [f"{_fmt(row[-3])}%" if row[-3] is not None else "–"] if ratio else []
        lines.append(
            "| " + " | ".join([row[0], tier, *scores, *extra, _fmt(row[-2]), _fmt(row[-1], 4)]) + " |"
        )
    metrics = ", ".join(f"{t}: {cell_metric(results, t)}" for t in tasks)
    lines += [
        "",
        f"Scores ({metrics}) in % when the metric is a fraction, with retention (% of vanilla) in "
        "brackets; avg_T (visual tokens per decoder layer) and TFLOPs (FastV's convention, text + visual "
        "tokens) as executed, averaged over the row's tasks.",
    ]
    if ratio:
        lines[-1] += (
            " avg ratio: the paper's summary, the mean over the RefCOCO splits of score ÷ vanilla score "
            "(splits where vanilla scored 0 left out)."
        )
    return "\n".join(lines) + "\n"


def csv_text(results: Sequence[dict[str, Any]]) -> str:
    header, rows = table_rows(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def chart(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Score against measured avg_T, one panel per task: a line per method, solid reroute, dashed prune,
    vanilla as a grey star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, _, _ = _rows(results)
    percent = _fraction_tasks(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    methods = sorted({r["method"] for r in results} - {"vanilla"})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, task in zip(axes[0], tasks, strict=True):
        scale = 100.0 if task in percent else 1.0
        mine = [r for r in results if r["task"] == task]
        for method in methods:
            for reroute in (False, True):
                points = sorted(
                    (r["avg_visual_tokens"], r["value"] * scale)
                    for r in mine
                    if r["method"] == method and r["reroute"] == reroute
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        "o-" if reroute else "s--",
                        color=colours[method],
                        label=_name(method, reroute),
                    )
        for r in mine:
            if r["method"] == "vanilla":
                ax.plot(
                    [r["avg_visual_tokens"]], [r["value"] * scale], "*", color="grey", ms=12, label="vanilla"
                )
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("avg_T (visual tokens per layer, measured)")
        ax.set_ylabel(f"{cell_metric(results, task)}{' (%)' if task in percent else ''}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def agreement(cells_dir: str | Path) -> dict[tuple, float]:
    """Per cell, the fraction of answers identical to vanilla's on the same documents (from ``cells/``).

    Output fidelity: meaningful even when the scores are not (tiny random models score 0 everywhere).
    """
    import json

    cells = [json.loads(p.read_text()) for p in sorted(Path(cells_dir).glob("*.json"))]
    vanilla = {
        c["cell"]["task"]: {s["doc_id"]: s["resps"] for s in c["samples"]}
        for c in cells
        if c["cell"]["method"] == "vanilla"
    }
    out = {}
    for c in cells:
        base = vanilla.get(c["cell"]["task"])
        if not base or c["cell"]["method"] == "vanilla":
            continue
        same = [s["resps"] == base[s["doc_id"]] for s in c["samples"] if s["doc_id"] in base]
        if same:
            key = tuple(c["cell"][k] for k in ("task", "method", "reroute", "tier"))
            out[key] = sum(same) / len(same)
    return out


def agreement_markdown(results: Sequence[dict[str, Any]], shares: dict[tuple, float]) -> str:
    tasks, keys, _ = _rows(results)
    lines = ["| method | tier | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
    for method, reroute, tier in keys:
        if method == "vanilla":
            continue
        values = [shares.get((t, method, reroute, tier)) for t in tasks]
        cells = [_fmt(None if v is None else 100 * v) for v in values]
        lines.append(
            f"| {_name(method, reroute)} | {'–' if tier is None else f'{tier:g}'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_reports(results: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> dict[str, Path]:
    """``table.md`` (scores, then answers identical to vanilla), ``table.csv``, ``chart.png`` in ``out``."""
    out = Path(out)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv", "chart": out / "chart.png"}
    text = markdown(results, title)
    shares = agreement(out / "cells")
    if shares:
        text += "\nAnswers identical to vanilla's (%, same documents):\n\n" + agreement_markdown(
            results, shares
        )
    paths["markdown"].write_text(text)
    paths["csv"].write_text(csv_text(results))
    chart(results, paths["chart"])
    return paths
