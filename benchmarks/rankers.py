"""What the new rankers cost: SparseVLM, DART (and any other registered method) against FastV and PDrop.

Issue 19's performance targets, on the 32-layer LLaVA-style bench shape of ``speed.py`` (hidden 512,
8 heads, FFN 1408; 576 visual + 45 text tokens), random weights, fp32, sdpa, two threads:

* **SparseVLM at PDrop's schedule**: SparseVLM (text raters, query-row attention) and PDrop run the
  *same* decision layers and keep counts (PDrop solved for avg_T = 64), so the difference is the
  scorer alone. Target: SparseVLM's prefill within 3 % of PDrop's (median of the paired per-repeat
  ratios ``sparsevlm / pdrop``).
* **DART against the ideal router**: DART (set selection by pivot duplication) solved for avg_T = 64,
  prune and reroute, with the zero-overhead router of ``vlm_reroute.bench.ideal``. Target: ideal /
  measured ≥ 0.95.
* FastV, FastV + Reroute at the same avg_T, for reference.

Every configuration runs in turn in every repeat after a warm-up (``vlm_reroute.bench.profile``);
ratios are medians of per-repeat ratios, with min–max. ``--wait-quiet S`` waits for a 1-minute load
below 1 before starting, and the load is recorded::

    python benchmarks/rankers.py --out docs/benchmarks --repeats 9 --wait-quiet 600
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median
from typing import Any

import torch
from speed import wait_for_quiet  # this folder is on the path when the script runs

from vlm_reroute.bench.profiler import profile
from vlm_reroute.budget import ModelShape
from vlm_reroute.budget.solver import solve
from vlm_reroute.methods import TokenReduction, method_class
from vlm_reroute.testing.models import TextShape, tiny_inputs, tiny_model

AVG_T = 64
N_VISUAL = 576


def configurations(model: torch.nn.Module) -> dict[str, TokenReduction]:
    """FastV (both modes), PDrop (both), SparseVLM on PDrop's schedules, DART (both) at avg_T 64."""
    shape = ModelShape.from_config(model.config)
    out: dict[str, TokenReduction] = {}
    for key in ("fastv", "pdrop", "dart"):
        pair = solve(shape, N_VISUAL, key, avg_t=AVG_T)
        for schedule in (pair.prune, pair.reroute):
            out[schedule.name] = schedule.to_method()
            if key == "pdrop":
                sparse = method_class("sparsevlm", schedule.reroute)[0]
                twin = sparse.from_schedule(schedule.to_method().schedule())
                out[f"SparseVLM at {schedule.name}'s schedule"] = twin
    return out


def paired(report: Any, a: str, b: str) -> dict[str, float]:
    """Median and min–max of the per-repeat ratios of prefill times ``a / b``."""
    ra, rb = report.row(a).prefill_runs_s, report.row(b).prefill_runs_s
    ratios = [x / y for x, y in zip(ra, rb, strict=True)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--wait-quiet", type=float, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    load = wait_for_quiet(args.wait_quiet)
    model = tiny_model("llava", shape=TextShape(32, 512, 8, None, 1408), vocab=32000)
    inputs = tiny_inputs(model, (40,))
    methods = configurations(model)
    report = profile(
        model,
        inputs,
        methods,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=0,
        ideal=True,
        progress=not args.no_progress,
        memory=False,
    )
    data = report.to_dict()
    data["load_at_start"] = load
    data["targets"] = {
        "sparsevlm_over_pdrop": {
            mode: paired(report, f"SparseVLM at {name}'s schedule", name)
            for mode, name in (("prune", "PDrop"), ("reroute", "PDrop + Reroute"))
        },
        "dart_ideal_fraction": {
            name: {"median": report.row(name).ideal_fraction, "range": report.row(name).ideal_fraction_range}
            for name in ("DART", "DART + Reroute")
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rankers.json").write_text(json.dumps(data, indent=2))
    from rich.console import Console

    console = Console(width=120)
    console.print(report.title())
    console.print(report.table())
    for table in report.detail_tables():
        console.print(table)
    console.print(f"1-min load at start {load:.2f}")
    console.print_json(data=data["targets"])


if __name__ == "__main__":
    main()
