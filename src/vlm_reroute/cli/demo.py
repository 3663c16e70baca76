"""``vlm-reroute demo``: the shipped demo model on held-out scenes, vanilla and each method in both modes.

With no arguments it loads the model shipped in the package (offline), draws the held-out scenes
(200 grounding, 100 VQA), answers them under vanilla and FastV, PDrop and Nüwa in both modes at
the demo's budget, and prints Acc@0.5 per expression family and overall with 95 % intervals, VQA
accuracy, avg_T, theoretical FLOPs, KV cache and prefill time. ``--out DIR`` writes the pictures
(boxes, routing prune vs reroute, and with ``--ratios`` accuracy against the budget).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .app import (
    AsJson,
    Device,
    Dtype,
    FlopsFraction,
    Output,
    Strict,
    Threads,
    Tier,
    WithdrawAt,
    app,
    budget_spec,
    check_folder,
    check_output,
    describe_budget,
    fail,
    our_warnings,
    print_json,
    threads_text,
    torch_threads,
    withdraw_option,
    write_json,
)

#: the demo's default budget: the most aggressive ratio of the sweep at which the better of PDrop
#: prune and PDrop reroute keeps >= 50 % of vanilla's Acc@0.5 (docs/demo.md says when it was chosen)
DEMO_RATIO = 0.333

DemoRatio = Annotated[
    float | None,
    typer.Option(
        "--ratio",
        help=f"budget: fraction of visual tokens kept on average over the layers (default {DEMO_RATIO})",
    ),
]


@app.command()
def demo(
    model: Annotated[
        str | None, typer.Option("--model", help="model folder (default: the shipped demo)")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="held-out grounding scenes")] = 200,
    n_vqa: Annotated[int, typer.Option("--n-vqa", help="held-out VQA scenes")] = 100,
    seed: Annotated[
        int | None, typer.Option(help="scene seed (default: the benchmark's held-out seed)")
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="methods, prune and reroute each (default: fastv, pdrop, nuwa)"),
    ] = None,
    tier: Tier = None,
    ratio: DemoRatio = None,
    flops_fraction: FlopsFraction = None,
    strict: Strict = False,
    withdraw_at: WithdrawAt = None,
    ratios: Annotated[
        str | None, typer.Option(help="also sweep these ratios, e.g. 0.333,0.222,0.111")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="scenes per batch")] = 25,
    blank: Annotated[
        bool, typer.Option(help="add the control row: vanilla on blank (grey) images, which must fail")
    ] = True,
    out: Annotated[Path | None, typer.Option(help="folder for the pictures")] = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
    threads: Threads = None,
    as_json: AsJson = False,
    output: Output = None,
) -> None:
    """Benchmark the shipped demo model: accuracy with 95 % CIs, cost, and pictures."""
    output = check_output(output)
    _check_counts(n, n_vqa)
    if tier is None and ratio is None and flops_fraction is None:
        ratio = DEMO_RATIO
    spec = budget_spec(tier, ratio, flops_fraction, strict, explicit_keep=False)
    withdraw = {"withdraw_at": withdraw_at} if withdraw_option(withdraw_at) is not None else {}
    sweep = _parse_ratios(ratios)
    out = check_folder(out, "--out")
    folder = _model_folder(model)

    from ..demo.benchmark import DEMO_SEED, METHODS, configurations, held_out
    from ..loading import LoadError, quiet_transformers
    from ..pipelines import pipeline

    keys = _method_keys(method) if method else list(METHODS)
    with quiet_transformers(), our_warnings() as shown, torch_threads(threads) as (n_threads, default):
        started = time.perf_counter()
        try:
            pipe = pipeline(folder, None, dtype=dtype, device=device, max_new_tokens=12)
            ground, vqa = held_out(n, n_vqa, DEMO_SEED if seed is None else seed)
            configs = configurations(pipe.model, {**spec, **withdraw}, strict, keys)
            results = _run_all(pipe, configs, [*ground, *vqa], batch_size, blank)
            swept = (
                _sweep(pipe, results[0], sweep, ground, strict, keys, batch_size, withdraw) if sweep else None
            )
            drawn = [r for r in results if r.method != "blank"]
            files = _pictures(out, pipe, ground, drawn, configs, swept) if out is not None else []
        except (LoadError, ValueError, TypeError) as exc:
            fail(str(exc))
        report = {
            "model": str(folder),
            "budget": spec,
            "withdraw_at": withdraw_at,
            "seed": DEMO_SEED if seed is None else seed,
            "scenes": {"ground": n, "vqa": n_vqa},
            "threads": n_threads,
            "seconds": time.perf_counter() - started,
            **_rows(results, swept, files),
            "warnings": shown,
        }
    write_json(output, report)
    if as_json:
        print_json(report)
        return
    withdrawn = f", withdrawn from layer {withdraw_at}" if withdraw else ""
    _print(report, describe_budget(spec) + withdrawn, threads_text(n_threads, default))


def _check_counts(n: int, n_vqa: int) -> None:
    if n < 1:
        fail(f"--n {n}: give at least 1 grounding scene")
    if n_vqa < 0:
        fail(f"--n-vqa {n_vqa}: give a count >= 0")


def _rows(results: list, swept: dict | None, files: list[Path]) -> dict[str, Any]:
    """The report's result rows, sweep and picture files (per-scene answers left out)."""
    return {
        "results": [_public(r.to_dict()) for r in results],
        "sweep": {str(q): rows for q, rows in swept.items()} if swept else None,
        "files": [str(f) for f in files],
    }


def _model_folder(model: str | None) -> str:
    from ..demo import checkpoint_path, has_checkpoint

    if model is not None:
        return model
    if not has_checkpoint():
        fail(
            f"the demo checkpoint is missing from {checkpoint_path()}: export one with "
            "`python -m vlm_reroute.demo.export TRAINING_FOLDER` or give --model"
        )
    return str(checkpoint_path())


def _parse_ratios(text: str | None) -> list[float]:
    if text is None:
        return []
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"--ratios {text!r}: give comma-separated fractions in (0, 1], e.g. 0.333,0.222,0.111")
    if not values or not all(0 < v <= 1 for v in values):
        fail(f"--ratios {text!r}: every ratio must be in (0, 1]")
    return sorted(set(values), reverse=True)


def _method_keys(names: list[str]) -> list[str]:
    from ..methods.registry import method_class

    keys: list[str] = []
    for name in names:
        try:
            cls, _ = method_class(name)
        except ValueError as exc:
            fail(str(exc))
        if cls.key not in keys:
            keys.append(cls.key)
    return keys


def _progress(total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), transient=True)


def _run_all(pipe: Any, configs: list, items: list[dict], batch_size: int, blank: bool) -> list:
    """Every configuration on ``items``; with ``blank``, then vanilla on the same items blanked."""
    from ..demo.benchmark import BLANK, blanked, run_config

    pipe.batch([(items[0]["image"], items[0]["prompt"])], None, max_new_tokens=2)  # warm-up, untimed
    runs = [(config, items) for config in configs] + ([(BLANK, blanked(items))] if blank else [])
    results = []
    with _progress(len(runs) * len(items)) as bar:
        task = bar.add_task("demo", total=len(runs) * len(items))
        for config, chosen in runs:
            bar.update(task, description=config[0])
            results.append(run_config(pipe, config, chosen, batch_size, functools.partial(bar.advance, task)))
    return results


def _sweep(
    pipe: Any, vanilla: Any, ratios: list[float], ground: list[dict], strict: bool, keys, batch_size, withdraw
):
    """Grounding accuracy of every method at each ratio (vanilla's row repeated for reference);
    ``withdraw``: ``{"withdraw_at": K}`` or ``{}``."""
    from ..demo.benchmark import configurations, run_config

    rows: dict[float, list[dict[str, Any]]] = {}
    plain = _public(vanilla.to_dict())
    for q in ratios:
        configs = configurations(pipe.model, {"ratio": q, **withdraw}, strict, keys)[1:]
        with _progress(len(configs) * len(ground)) as bar:
            task = bar.add_task(f"ratio {q:g}", total=len(configs) * len(ground))
            advance = functools.partial(bar.advance, task)
            done = [run_config(pipe, c, ground, batch_size, advance) for c in configs]
        rows[q] = [plain, *(_public(r.to_dict()) for r in done)]
    return rows


def _pictures(out: Path, pipe: Any, ground: list[dict], results: list, configs: list, swept) -> list[Path]:
    from ..demo.pictures import boxes_png, budget_png, routing_pngs

    files = [boxes_png(ground, results, out / "boxes.png")]
    primary = next((c for c in configs if c[1] == "pdrop" and c[2] is False), configs[-1])
    if primary[3] is not None:
        files += routing_pngs(pipe, ground, primary[3], out)
    if swept:
        files.append(budget_png(swept, out / "budget.png"))
    return files


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A result row without its per-scene answers (the JSON stays readable)."""
    return {k: v for k, v in row.items() if k != "answers"}


def _cell(acc: dict[str, Any]) -> str:
    """``62.5 ±6.8``: the accuracy and half the width of its 95 % Wilson interval (JSON has both ends)."""
    if not acc["n"]:
        return "–"
    low, high = acc["ci95"]
    return f"{100 * acc['acc']:.1f} ±{50 * (high - low):.1f}"


def _print(report: dict[str, Any], budget: str, threads: str) -> None:
    from rich import box

    from ..demo.scenes import GROUND_FAMILIES

    console = Console(highlight=False)
    scenes = report["scenes"]
    console.print(
        f"demo model {report['model']}: {scenes['ground']} grounding + {scenes['vqa']} VQA held-out scenes "
        f"(seed {report['seed']}); {budget}; {threads}; {report['seconds']:.0f} s"
    )
    accuracy = Table(
        title="Acc@0.5 % per expression family, VQA accuracy % (± half the 95 % CI)", box=box.SIMPLE_HEAD
    )
    cost = Table(title="cost per prompt (prefill; theoretical FLOPs and KV cache)", box=box.SIMPLE_HEAD)
    for col in ("configuration", *GROUND_FAMILIES, "grounding", "VQA"):
        accuracy.add_column(col, justify="left" if col == "configuration" else "right")
    for col in ("configuration", "avg_T", "GFLOPs", "KV MB", "prefill ms"):
        cost.add_column(col, justify="left" if col == "configuration" else "right")
    for row in report["results"]:
        acc, spent = row["accuracy"], row["cost"]
        accuracy.add_row(row["name"], *(_cell(acc[f]) for f in (*GROUND_FAMILIES, "ground", "vqa")))
        cost.add_row(
            row["name"],
            f"{spent['avg_visual_tokens']:.1f}",
            f"{spent['tflops'] * 1e3:.3f}",
            f"{spent['kv_bytes'] / 1e6:.2f}",
            f"{spent['prefill_ms']:.1f}",
        )
    console.print(accuracy)
    console.print(cost)
    if report["sweep"]:
        sweep = Table(
            title="grounding Acc@0.5 % against the ratio of visual tokens kept", box=box.SIMPLE_HEAD
        )
        ratios = list(report["sweep"])
        sweep.add_column("configuration")
        for q in ratios:
            sweep.add_column(f"ratio {q}", justify="right")
        for k, row in enumerate(report["sweep"][ratios[0]]):
            sweep.add_row(row["name"], *(_cell(report["sweep"][q][k]["accuracy"]["ground"]) for q in ratios))
        console.print(sweep)
    for f in report["files"]:
        console.print(f"picture: {f}")
