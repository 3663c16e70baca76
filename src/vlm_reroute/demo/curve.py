"""The training record: one JSON line per logged step or evaluation, and the curve drawn from it.

The record lives beside the checkpoint (``history.jsonl``, ``curve.png``), so a resumed run keeps
appending to the same curve, with time on the x axis counted over all the runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append(folder: Path, entry: dict[str, Any]) -> None:
    """Add one record line."""
    with open(folder / "history.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def read(folder: Path) -> list[dict[str, Any]]:
    """All record lines (none if the file does not exist yet)."""
    path = folder / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], width: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot(folder: Path) -> Path:
    """Draw ``curve.png``: the losses, and held-out accuracy per configuration, against hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(folder)
    steps = [r for r in rows if r.get("type") == "step"]
    evals = [r for r in rows if r.get("type") == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "lm", "aux"):
        if steps:
            left.plot([r["hours"] for r in steps], _smooth([r[key] for r in steps]), label=key)
    left.set_yscale("log")
    left.set_xlabel("training hours (2 CPU cores)")
    left.set_title("training loss (smoothed)")
    left.legend()
    names = sorted({k for r in evals for k in r if k.startswith(("ground", "vqa"))})
    for name in names:
        pts = [(r["hours"], r[name]) for r in evals if name in r]
        right.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    right.set_ylim(0, 100)
    right.set_xlabel("training hours (2 CPU cores)")
    right.set_title("held-out greedy accuracy (%)")
    if names:
        right.legend(fontsize=7)
    fig.tight_layout()
    out = folder / "curve.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
