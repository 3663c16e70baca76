"""What the new rankers cost: SparseVLM, DART, DivPrune, VisionZip against FastV, PDrop and the ideal router.

Issue 19's performance targets, on the 32-layer LLaVA-style bench shape of ``speed.py`` (hidden 512,
8 heads, FFN 1408; 576 visual + 45 text tokens), random weights, fp32, sdpa, two threads:

* **SparseVLM at PDrop's schedule**: SparseVLM (text raters, query-row attention) and PDrop run the
  *same* decision layers and keep counts (PDrop solved for avg_T = 64), so the difference is the
  scorer alone. Target: SparseVLM's prefill within 3 % of PDrop's (median of the paired per-repeat
  ratios ``sparsevlm / pdrop``).
* **DART and DivPrune against the ideal router**: each solved for avg_T = 64, with the zero-overhead
  router of ``vlm_reroute.bench.ideal`` (the layers alone on the token counts the run left, plus
  vanilla's time outside the decoder). Target: ideal / measured ≥ 0.95. DART: prune and reroute.
* **DivPrune and VisionZip (stage 1)** alone: ``k = 64`` tokens enter layer 0 (their solved schedule
  at avg_T 64; the one pass-through decision at layer 16 keeps all 64 and ranks nothing).
  Their reroute form alone would only repeat pass-through decisions, so reroute is measured composed:
  ``DivPrune / VisionZip (k = 192, VisionZip's largest reference tier) + PDrop + Reroute``, PDrop's
  reroute schedule solved over the 192 entering tokens for the same avg_T 64. VisionZip's work (a
  hook on the vision tower) is outside the decoder, where the ideal router charges vanilla's time.
* FastV, FastV + Reroute at the same avg_T are the common yardstick: each selector's overhead
  (measured − ideal, per repeat) next to FastV's of the same mode, and the paired prefill ratio.

Every configuration runs in turn in every repeat after a warm-up (``vlm_reroute.bench.profile``);
paired ratios are medians of per-repeat ratios, with min–max (the report's own ideal / measured is a
ratio of medians; the JSON gives both). ``--wait-quiet S`` waits for a 1-minute load below 1 before
starting, and the load is recorded::

    python benchmarks/rankers.py --out docs/benchmarks --repeats 9 --wait-quiet 600

``--quick`` is a smoke run (a 32-layer decoder of hidden 64, so the same schedules; 2 repeats, one
thread; its times mean nothing): it writes ``rankers_quick.json`` to a temporary folder (or
``--out``), never ``rankers.json``::

    python benchmarks/rankers.py --quick
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch
from speed import wait_for_quiet  # this folder is on the path when the script runs

from vlm_reroute.bench.profiler import profile
from vlm_reroute.budget import ModelShape
from vlm_reroute.budget.solver import solve
from vlm_reroute.methods import TokenReduction, method_class
from vlm_reroute.testing.models import VOCAB, TextShape, tiny_inputs, tiny_model

AVG_T = 64
N_VISUAL = 576
STAGE1_ENTRY = 192  # tokens entering before PDrop + Reroute in the composed rows (VisionZip's 162 + 30)
STAGE1 = ("divprune", "visionzip")
BENCH_SHAPE, BENCH_VOCAB = TextShape(32, 512, 8, None, 1408), 32000
QUICK_SHAPE, QUICK_REPEATS = TextShape(32, 64, 4, None, 128), 2  # same depth: same schedules


def configurations(model: torch.nn.Module) -> dict[str, TokenReduction]:
    """FastV, PDrop, DART (both modes) at avg_T 64, SparseVLM on PDrop's schedules, then the stage-1
    methods alone and composed with PDrop + Reroute (see the module docstring)."""
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
    inner = solve(shape, STAGE1_ENTRY, "pdrop", avg_t=AVG_T).reroute.to_method()
    for key in STAGE1:
        alone = solve(shape, N_VISUAL, key, avg_t=AVG_T).prune
        out[alone.name] = alone.to_method()
        composed = method_class(key)[0](k=STAGE1_ENTRY) + inner
        out[composed.name] = composed
    return out


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and min–max of the per-repeat ratios ``a / b``."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}


def prefill_ratio(report: Any, a: str, b: str) -> dict[str, float]:
    """Paired prefill ratio of configurations ``a / b``."""
    return paired(report.row(a).prefill_runs_s, report.row(b).prefill_runs_s)


def overhead_ms(report: Any, name: str) -> dict[str, float]:
    """Median and min–max of the per-repeat ``measured − ideal`` prefill, in ms."""
    row = report.row(name)
    diffs = [(m - i) * 1e3 for m, i in zip(row.prefill_runs_s, row.ideal_runs_s, strict=True)]
    return {"median": median(diffs), "min": min(diffs), "max": max(diffs)}


def ideal_fraction(report: Any, name: str) -> dict[str, Any]:
    """Ideal / measured: the report's ratio of medians (quartile range) and the paired per-repeat one."""
    row = report.row(name)
    return {
        "median": row.ideal_fraction,
        "range": row.ideal_fraction_range,
        "paired": paired(row.ideal_runs_s, row.prefill_runs_s),
    }


def yardstick(reroute: bool) -> str:
    """FastV of the same mode, the common yardstick (the composed stage-1 rows reroute)."""
    return "FastV + Reroute" if reroute else "FastV"


def targets(report: Any, methods: dict[str, TokenReduction]) -> dict[str, Any]:
    """The issue's targets, and every selector's overhead next to FastV's at the same avg_T."""
    stage1 = [n for n, m in methods.items() if type(m).key in STAGE1]
    selectors = [n for n in methods if not n.startswith(("FastV", "PDrop"))]
    return {
        "sparsevlm_over_pdrop": {
            mode: prefill_ratio(report, f"SparseVLM at {name}'s schedule", name)
            for mode, name in (("prune", "PDrop"), ("reroute", "PDrop + Reroute"))
        },
        "dart_ideal_fraction": {n: ideal_fraction(report, n) for n in ("DART", "DART + Reroute")},
        "stage1_ideal_fraction": {n: ideal_fraction(report, n) for n in stage1},
        "overhead_vs_fastv": {
            name: {
                "fastv": (fast := yardstick(methods[name].reroute)),
                "overhead_ms": overhead_ms(report, name),
                "fastv_overhead_ms": overhead_ms(report, fast),
                "prefill_over_fastv": prefill_ratio(report, name, fast),
            }
            for name in selectors
        },
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for rankers.json (default docs/benchmarks)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9; quick 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--wait-quiet", type=float, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; quick 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: hidden-64 decoder of the same depth, 2 repeats, rankers_quick.json in a temp folder",
    )
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 9
    if args.threads is None:  # one thread: a smoke run on a busy machine is not held up by thread barriers
        args.threads = 1 if args.quick else 2
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "vlm-reroute-rankers-quick" if args.quick else "docs/benchmarks"
        )
    return args


def run(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Build the model and the configurations, profile them; the report and its JSON with targets."""
    shape, vocab = (QUICK_SHAPE, VOCAB) if args.quick else (BENCH_SHAPE, BENCH_VOCAB)
    load = wait_for_quiet(args.wait_quiet)
    started = time.perf_counter()
    model = tiny_model("llava", shape=shape, vocab=vocab)
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
    data["quick"] = args.quick
    data["seconds"] = time.perf_counter() - started
    data["targets"] = targets(report, methods)
    return report, data


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    report, data = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("rankers_quick.json" if args.quick else "rankers.json")
    path.write_text(json.dumps(data, indent=2))
    from rich.console import Console

    console = Console(width=120)
    console.print(report.title())
    console.print(report.table())
    for table in report.detail_tables():
        console.print(table)
    console.print(f"1-min load at start {data['load_at_start']:.2f}; {data['seconds']:.0f} s; wrote {path}")
    console.print_json(data=data["targets"])


if __name__ == "__main__":
    main()
