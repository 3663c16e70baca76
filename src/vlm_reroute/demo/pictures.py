"""The demo's pictures: predicted boxes against the gold box, routing prune vs reroute, accuracy vs budget.

``boxes.png`` puts a few held-out scenes in rows and the configurations in columns, with the gold
box (green) and the configuration's box (magenta), so what reduction does to *where* is visible at a
glance. ``routing-<i>.png`` are the project's routing figures (:func:`vlm_reroute.viz.figure.plot_trace`)
for the same scenes under the primary method's prune and reroute twins on one fixed schedule, and
``budget.png`` is the sweep over ``--ratios``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .benchmark import ConfigResult

GOLD, PRED = "#1a9850", "#d01c8b"


def boxes_png(scenes: Sequence[dict], results: Sequence[ConfigResult], path: Path, rows: int = 4) -> Path:
    """Scenes × configurations, gold and predicted boxes (grounding scenes only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = list(scenes[:rows])
    fig, axes = plt.subplots(
        len(shown), len(results), figsize=(1.9 * len(results), 2.1 * len(shown)), squeeze=False
    )
    for r, scene in enumerate(shown):
        width, height = scene["image"].size
        for c, result in enumerate(results):
            ax = axes[r][c]
            ax.imshow(scene["image"])
            x1, y1, x2, y2 = scene["box"]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=GOLD, lw=2))
            graded = result.ground[r]
            if graded.box is not None:
                bx1, by1, bx2, by2 = graded.box
                ax.add_patch(
                    Rectangle((bx1 * width, by1 * height), (bx2 - bx1) * width, (by2 - by1) * height,
                              fill=False, ec=PRED, lw=2, ls="-" if graded.correct else "--")
                )  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(result.name, fontsize=7)
            if c == 0:
                ax.set_ylabel(_wrap(scene["prompt"]), fontsize=6)
    fig.suptitle("gold box (green), answer (magenta; dashed = IoU < 0.5)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 30) -> str:
    words, lines, line = text.replace("Give the bounding box of ", "").split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def routing_pngs(pipe: Any, scenes: Sequence[dict], method: Any, folder: Path, count: int = 2) -> list[Path]:
    """The routing figure of prune vs reroute for the first ``count`` scenes, gold box drawn."""
    from ..adapters import adapter_for
    from ..comparison import prune_and_reroute
    from ..viz.figure import plot_trace

    written: list[Path] = []
    num_layers = len(adapter_for(pipe.model).layers)
    for i, scene in enumerate(scenes[:count]):
        inputs = pipe.inputs([(scene["image"], scene["prompt"])])
        runs = prune_and_reroute(method, True, pipe.model, inputs)
        traces = []
        for _, chosen in runs:
            with chosen(pipe.model) as trace, torch.no_grad():
                pipe.model(**inputs, use_cache=False)
            traces.append((trace, chosen.reroute))
        (first, first_reroute), (second, _) = traces
        written += plot_trace(
            first,
            [scene["image"]],
            folder / f"routing-{i}.png",
            pipe.builder.processor,
            sample=0,
            compare=second,
            labels=[name for name, _ in runs],
            reroute=first_reroute,
            box=tuple(float(v) for v in scene["box"]),
            num_layers=num_layers,
        )
    return written


def budget_png(sweep: dict[float, list[dict[str, Any]]], path: Path) -> Path:
    """Grounding Acc@0.5 (with 95 % intervals) against the ratio of visual tokens kept, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted(sweep)
    names = [row["name"] for row in sweep[ratios[0]]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, name in enumerate(names):
        accs = [next(r for r in sweep[q] if r["name"] == name)["accuracy"]["ground"] for q in ratios]
        values = [100 * a["acc"] for a in accs]
        low = [100 * (a["acc"] - a["ci95"][0]) for a in accs]
        high = [100 * (a["ci95"][1] - a["acc"]) for a in accs]
        style = "--" if name == "vanilla" else ("-" if "Reroute" in name else ":")
        shift = [q * (1 + 0.012 * (k - len(names) / 2)) for q in ratios]  # keep error bars apart
        ax.errorbar(shift, values, yerr=[low, high], ls=style, marker="o", ms=3, capsize=2, label=name)
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{q:g}" for q in ratios])
    ax.minorticks_off()  # the log axis's own minor labels would print over the chosen ratios
    ax.invert_xaxis()
    ax.set_xlabel("ratio of visual tokens kept (avg over decoder layers)")
    ax.set_ylabel("grounding Acc@0.5 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
