"""Vanilla (unreduced) accuracy of demo-model checkpoints, per family: checkpoint choice and targets.

Two uses, both written down in docs/demo.md:

* **choosing the checkpoint to ship** (the rule fixed in run 8): vanilla greedy grounding + VQA on
  the selection seed 4242 (150 grounding + 100 VQA scenes), the highest sum wins; nothing reduced
  is measured, so the choice cannot favour prune or reroute::

      python benchmarks/demo_vanilla.py /work/run11-steps/step-* --seed 4242 --n-ground 150 --n-vqa 100

* **issue 17's vanilla targets** on the benchmark's held-out seed (2025): 1,000 grounding scenes
  (≥ 70 %) and 500 VQA scenes (≥ 90 %)::

      python benchmarks/demo_vanilla.py src/vlm_reroute/demo/checkpoint --n-ground 1000 --n-vqa 500

Prints one line per checkpoint (overall and per family, with 95 % Wilson intervals) and, with
``--json FILE``, writes the same figures. Scenes are answered in batches of 20 through the
project's pipeline, exactly as ``vlm-reroute demo`` answers them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def per_family(results: list[Any]) -> dict[str, dict[str, Any]]:
    """Accuracy overall (``"all"``) and per family, each with its Wilson interval."""
    from vlm_reroute.demo.benchmark import Cell

    groups: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        groups["all"].append(r.correct)
        groups[r.family].append(r.correct)
    return {k: Cell(sum(v), len(v)).to_dict() for k, v in groups.items()}


def measure(folder: str, seed: int, n_ground: int, n_vqa: int) -> dict[str, Any]:
    """Vanilla greedy answers of the checkpoint in ``folder`` on ``seed``'s first scenes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_reroute.demo import scenes
    from vlm_reroute.demo.evaluate import answer_scenes, demo_pipeline

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    pipe = demo_pipeline(model, AutoProcessor.from_pretrained(folder))
    began = time.monotonic()
    out: dict[str, Any] = {"model": folder, "seed": seed}
    for kind, n in (("ground", n_ground), ("vqa", n_vqa)):
        if n:
            out[kind] = per_family(answer_scenes(pipe, scenes(n, seed=seed, kind=kind), None))
    out["seconds"] = round(time.monotonic() - began, 1)
    return out


def line(row: dict[str, Any]) -> str:
    """``folder: ground 74.7 (attribute …) | vqa 56.0 (color …) | sum …``."""
    parts, total = [], 0.0
    for kind in ("ground", "vqa"):
        if kind in row:
            cells = row[kind]
            total += 100 * cells["all"]["acc"]
            fams = " ".join(f"{k} {100 * v['acc']:.1f}" for k, v in cells.items() if k != "all")
            low, high = cells["all"]["ci95"]
            parts.append(f"{kind} {100 * cells['all']['acc']:.1f} ({100 * low:.1f}–{100 * high:.1f}; {fams})")
    return f"{row['model']}: " + " | ".join(parts) + f" | sum {total:.1f} | {row['seconds']} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="save_pretrained folders of demo checkpoints")
    parser.add_argument("--seed", type=int, default=2025, help="scene seed (2025 benchmark, 4242 selection)")
    parser.add_argument("--n-ground", type=int, default=1000)
    parser.add_argument("--n-vqa", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for folder in args.models:
        rows.append(measure(folder, args.seed, args.n_ground, args.n_vqa))
        print(line(rows[-1]), flush=True)
        if args.json is not None:  # after every checkpoint: a failure keeps what was measured
            args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
