"""CPU speed and memory benchmark of FastV / PDrop, prune and reroute, on random-weight models of real shapes.

Usage (writes JSON, PNGs and profiles to ``--out``; results are summarised in docs/benchmarks.md)::

    python benchmarks/speed.py --out docs/benchmarks            # everything, ~10 min on 2 cores
    python benchmarks/speed.py --only small --repeats 3         # one experiment

Experiments (``--only``):

* ``llava32``: a 32-layer LLaVA-style decoder (hidden 512, 8 heads, FFN 1408, vocab 32000; 576 visual
  + 45 text tokens) so the published 32-layer decision layers apply unchanged; the four methods
  solved for avg_T = 64, with the ideal router. Target: PDrop + Reroute ideal / measured ≥ 0.95.
* ``qwen28``: a 28-layer Qwen2.5-VL-style GQA decoder (hidden 512, 8 heads, 2 KV heads), same methods.
* ``memory``: 14 images (8,064 visual tokens) on the tiny 8-layer LLaVA; each configuration's
  prefill in a fresh subprocess. Target: routed peak process RSS ≤ 1.10 × vanilla's.
* ``small``: the tiny 8-layer, hidden-64 models; reroute with decisions [1, 2, 4, 6] keeping
  [16, 16, 8, 4] (and its matched prune). Target: faster than vanilla.

The router-time breakdown lives in ``_speed_router.py``, the verdicts and Markdown tables in
``_speed_report.py`` (imported from this folder, which Python puts on the path for the script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from statistics import median
from typing import Any

import torch
from _speed_report import markdown, summarise
from _speed_router import router_breakdown, torch_profile

from vlm_reroute import PDrop
from vlm_reroute.bench.measure import environment, prefill_memory
from vlm_reroute.bench.plots import speedup_png, tokens_per_layer_png
from vlm_reroute.bench.profiler import ProfileReport, profile
from vlm_reroute.budget import ModelShape
from vlm_reroute.budget.solver import solve
from vlm_reroute.methods import TokenReduction
from vlm_reroute.testing.models import TextShape, tiny_inputs, tiny_model

EXPERIMENTS = ("llava32", "qwen28", "memory", "small")
SMALL_LAYERS, SMALL_KEEP = [1, 2, 4, 6], [16, 16, 8, 4]
MEMORY_IMAGES = 14


def solved_methods(model: torch.nn.Module, n_visual: int, avg_t: float) -> dict[str, TokenReduction]:
    """FastV, FastV + Reroute, PDrop, PDrop + Reroute solved for ``avg_t`` on the model's depth."""
    return _as_methods(ModelShape.from_config(model.config), n_visual, avg_t)


def _as_methods(shape: ModelShape | int, n_visual: int, avg_t: float) -> dict[str, TokenReduction]:
    pairs = [solve(shape, n_visual, method, avg_t=avg_t) for method in ("fastv", "pdrop")]
    return {s.name: s.to_method() for pair in pairs for s in (pair.prune, pair.reroute)}


def save(report: ProfileReport, out: Path, stem: str) -> dict[str, Any]:
    data = report.to_dict()
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    tokens_per_layer_png(report, out / f"{stem}_tokens_per_layer.png")
    speedup_png(report, out / f"{stem}_speedup.png")
    return data


def run_decoder(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    if name == "llava32":
        model = tiny_model("llava", shape=TextShape(32, 512, 8, None, 1408), vocab=32000)
    else:
        model = tiny_model("qwen2_5_vl", shape=TextShape(28, 512, 8, 2, 1408), vocab=32000)
    inputs = tiny_inputs(model, (40,))
    methods = solved_methods(model, 576, 64)
    report = profile(
        model,
        inputs,
        methods,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=args.decode_tokens,
        decode_repeats=args.decode_repeats,
        ideal=True,
        progress=not args.no_progress,
    )
    torch_profile(model, inputs, methods["PDrop + Reroute"], out / f"{name}_profile_pdrop_reroute.txt")
    data = save(report, out, name)
    data["router_breakdown"] = {k: router_breakdown(model, inputs, methods[k]) for k in methods}
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    return data


def run_small(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    results = {}
    for family in ("llava", "qwen2_5_vl"):
        model = tiny_model(family)
        inputs = tiny_inputs(model, (20,))
        methods = {
            "PDrop": PDrop(layers=SMALL_LAYERS, keep=SMALL_KEEP),
            "PDrop + Reroute": PDrop(layers=SMALL_LAYERS, keep=SMALL_KEEP, reroute=True),
        }
        report = profile(
            model,
            inputs,
            methods,
            repeats=args.repeats * 2,
            warmup=args.warmup + 2,
            decode_tokens=args.decode_tokens,
            decode_repeats=args.decode_repeats * 2,
            ideal=True,
            progress=not args.no_progress,
        )
        path = out / f"small_{family}_profile_pdrop_reroute.txt"
        torch_profile(model, inputs, methods["PDrop + Reroute"], path)
        data = save(report, out, f"small_{family}")
        data["router_breakdown"] = {k: router_breakdown(model, inputs, methods[k], runs=20) for k in methods}
        (out / f"small_{family}.json").write_text(json.dumps(data, indent=2))
        results[family] = data
    return results


# ---- memory: one configuration per fresh process ------------------------------------------------


def memory_methods() -> dict[str, TokenReduction | None]:
    return {"vanilla": None, **_as_methods(8, 576, 128)}


def memory_child(name: str) -> None:
    """Runs in a fresh process: one prefill of one configuration; prints its memory as JSON."""
    torch.set_num_threads(2)
    model = tiny_model("llava")
    inputs = tiny_inputs(model, (40,), images_per_prompt=MEMORY_IMAGES)
    method = memory_methods()[name]
    start = time.perf_counter()
    with torch.no_grad(), method(model) if method else nullcontext():
        stats = prefill_memory(model, lambda: model(**inputs, use_cache=True, logits_to_keep=1))
    print(
        json.dumps(
            {
                "name": name,
                "method": repr(method) if method else "vanilla",
                "seq_len": inputs["input_ids"].shape[1],
                "visual_tokens": int((inputs["input_ids"] == model.config.image_token_index).sum()),
                "rss_before_bytes": stats.rss_before_bytes,
                "peak_rss_bytes": stats.peak_rss_bytes,
                "increase_bytes": stats.increase_bytes,
                "prefill_s": time.perf_counter() - start,
            }
        )
    )


def run_memory(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    runs: dict[str, list[dict]] = {name: [] for name in memory_methods()}
    for _ in range(args.memory_repeats):
        for name in runs:  # interleaved, like the timings
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", name], capture_output=True, text=True, check=True
            )
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  memory {name}: peak {runs[name][-1]['peak_rss_bytes'] / 2**20:.1f} MiB", flush=True)
    summary = {}
    base = median(r["peak_rss_bytes"] for r in runs["vanilla"])
    base_inc = median(r["increase_bytes"] for r in runs["vanilla"])
    for name, rs in runs.items():
        peak, inc = median(r["peak_rss_bytes"] for r in rs), median(r["increase_bytes"] for r in rs)
        summary[name] = {
            "method": rs[0]["method"],
            "peak_rss_bytes": peak,
            "peak_ratio_to_vanilla": peak / base,
            "increase_bytes": inc,
            "increase_ratio_to_vanilla": inc / base_inc,
            "runs": rs,
        }
    data = {"model": "tiny llava (8 layers, hidden 64)", "images": MEMORY_IMAGES, "configs": summary}
    (out / "memory.json").write_text(json.dumps(data, indent=2))
    return data


def git_state() -> dict[str, Any]:
    """Which engine was measured: the commit and any uncommitted source files."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": git("status", "--short", "--", "src").splitlines(),
    }


def wait_for_quiet(limit_s: float) -> float:
    """Wait (up to ``limit_s``) until the 1-min load is below 1: 2 cores shared with other work."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def _files(name: str, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """JSON file stem → data for an experiment (``small`` writes one file per family)."""
    if name == "small":
        return {f"small_{family}": data.get(family, {}) for family in ("llava", "qwen2_5_vl")}
    return {name: data}


def _load(name: str, out: Path) -> dict[str, Any]:
    files = {stem: json.loads((out / f"{stem}.json").read_text()) for stem in _files(name, {})}
    return {stem.removeprefix("small_"): d for stem, d in files.items()} if name == "small" else files[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks", help="folder for JSON, PNG and profile files")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats (median), interleaved")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--decode-repeats", type=int, default=3, help="repeats that also time decoding")
    parser.add_argument("--memory-repeats", type=int, default=2, help="fresh processes per memory config")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to S s for 1-min load < 1 first")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    env["git"] = git_state()
    print(f"load before: {os.getloadavg()}", flush=True)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.only:
        load = wait_for_quiet(args.wait_quiet) if args.wait_quiet else os.getloadavg()[0]
        print(f"{name}: 1-min load {load:.2f}", flush=True)
        t0 = time.perf_counter()
        if name in ("llava32", "qwen28"):
            results[name] = run_decoder(name, args, out)
        elif name == "small":
            results[name] = run_small(args, out)
        else:
            results[name] = run_memory(args, out)
        run = {
            "command": env["command"],
            "git": env["git"],
            "load_before": load,
            "seconds": time.perf_counter() - t0,
        }
        for stem, data in _files(name, results[name]).items():
            data["run"] = run
            (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
        print(f"{name}: {run['seconds']:.0f} s", flush=True)
    for name in EXPERIMENTS:  # earlier runs of the experiments not repeated now
        if name not in results and (out / f"{next(iter(_files(name, {})))}.json").exists():
            results[name] = _load(name, out)
    env["load_after"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - started
    lines = summarise(results)
    (out / "summary.json").write_text(json.dumps({"environment": env, "lines": lines}, indent=2))
    (out / "results.md").write_text(markdown(results))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
