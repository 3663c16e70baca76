"""PNG plots of a profile: visual tokens per layer per schedule, and measured vs ideal vs FLOPs speedup.

Every function takes a :class:`~vlm_reroute.bench.report.ProfileReport` or its ``to_dict()`` (so a
saved JSON file can be re-plotted) and writes with the Agg backend: no display needed. From a
saved report (``vlm-reroute bench --output``, ``benchmarks/speed.py``)::

    python -m vlm_reroute.bench.plots docs/benchmarks/llava32.json docs/benchmarks/llava32

writes ``llava32_tokens_per_layer.png`` and ``llava32_speedup.png`` beside it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = ["speedup_png", "tokens_per_layer_png"]


def _as_dict(report: Any) -> dict[str, Any]:
    return report.to_dict() if hasattr(report, "to_dict") else dict(report)


def _title(data: dict[str, Any]) -> str:
    model, inputs = data.get("model", {}), data.get("inputs", {})
    shape = model.get("shape", {})
    return (
        f"{model.get('class', 'model')} ({shape.get('num_layers', '?')} layers, hidden "
        f"{shape.get('hidden_size', '?')}), {inputs.get('visual_tokens', '?')} visual + "
        f"{inputs.get('text_tokens', '?')} text tokens"
    )


def tokens_per_layer_png(report: Any, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Visual tokens entering each decoder layer, prune schedules left and reroute schedules right.

    Matched schedules carry the same counts per layer; what differs is which tokens they are:
    under reroute the number of tokens that came back at each decision is written at that layer.
    """
    data = _as_dict(report)
    rows = data["rows"]
    vanilla = next((r for r in rows if r["name"] == "vanilla"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, reroute in zip(axes, (False, True), strict=True):
        if vanilla is not None:
            counts = vanilla["visual_tokens_per_layer"]
            ax.step(
                range(len(counts) + 1),
                [*counts, counts[-1]],
                where="post",
                ls="--",
                c="grey",
                label="vanilla",
            )
        for i, row in enumerate(r for r in rows if r["name"] != "vanilla"):
            if row["reroute"] != reroute:
                continue
            counts = row["visual_tokens_per_layer"]
            label = f"{row['name']} (avg_T {row['avg_visual_tokens']:.1f})"
            ax.step(
                range(len(counts) + 1),
                [*counts, counts[-1]],
                where="post",
                c=colors[i % len(colors)],
                lw=2,
                label=label,
            )
            if reroute:
                for layer, back in zip(row["layers"], row["reentered"], strict=False):
                    if back:
                        ax.annotate(
                            f"+{back}",
                            (layer, counts[layer]),
                            textcoords="offset points",
                            xytext=(2, 4),
                            fontsize=7,
                            color=colors[i % len(colors)],
                        )
        ax.set_title("reroute (number: tokens that came back)" if reroute else "prune")
        ax.set_xlabel("decoder layer")
        ax.set_yscale("symlog", linthresh=16)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("visual tokens entering the layer")
    fig.suptitle(title or _title(data), fontsize=10)
    return _save(fig, path)


def speedup_png(report: Any, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Prefill speedup over vanilla per method: measured, ideal router (if profiled), FLOPs theory;
    error bars span the quartile range of each measured speedup when the report has one."""
    data = _as_dict(report)
    rows = [r for r in data["rows"] if r["name"] != "vanilla"]
    series = [
        ("measured", "speedup"),
        ("ideal router", "ideal_speedup"),
        ("FLOPs (theory)", "theoretical_speedup"),
    ]
    series = [(label, key) for label, key in series if any(r.get(key) for r in rows)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.2), constrained_layout=True)
    for j, (label, key) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
        values = [r.get(key) or 0.0 for r in rows]
        spans = [r.get(f"{key}_range") for r in rows]  # quartile ranges (reports from this version on)
        yerr = None
        if all(spans):
            yerr = [
                [v - lo for v, (lo, _) in zip(values, spans, strict=True)],
                [hi - v for v, (_, hi) in zip(values, spans, strict=True)],
            ]
        bars = ax.bar(xs, values, width, label=label, yerr=yerr, capsize=3 if yerr else 0)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, c="grey", lw=0.8)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
    ax.set_ylabel("prefill speedup over vanilla (×)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or _title(data), fontsize=10)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    """``python -m vlm_reroute.bench.plots REPORT.json PREFIX``: both plots of a saved report."""
    if len(argv) != 2:
        sys.exit("usage: python -m vlm_reroute.bench.plots REPORT.json PREFIX")
    data = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    for path in (
        tokens_per_layer_png(data, f"{argv[1]}_tokens_per_layer.png"),
        speedup_png(data, f"{argv[1]}_speedup.png"),
    ):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
