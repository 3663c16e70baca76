"""``vlm-reroute eval``: a grid of methods × reroute on/off × tiers × tasks through lmms-eval, with a table.

Needs the ``eval`` extra (``pip install "vlm-reroute[eval]"``). Resumable: run the same command again
and finished cells are skipped. An unknown task, or a cell lmms-eval returns no results for (lmms-eval
itself would log the error and carry on), is one ``error:`` line and exit status 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, console, fail, warn

REROUTE_MODES = {"both": (False, True), "on": (True,), "off": (False,)}


def _split(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        fail(f"--{what} {text!r}: give a comma-separated list")
    return items


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in _split(text, what)]
    except ValueError:
        fail(f"--{what} {text!r}: give comma-separated numbers, e.g. 192,128,64")
    return []


def _datasets(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, location = item.partition("=")
        if not sep or not location:
            fail(
                f"--data {item!r}: give NAME=LOCATION, e.g. refcoco=lmms-lab/RefCOCO or refcoco=/data/refcoco"
            )
        out[name.strip()] = location.strip()
    return out


def _build_model(model_args: dict[str, Any]) -> Any:
    """The lmms-eval model, loaded once for the whole grid; a clamped budget is one ``warning:`` line."""
    from ..eval.model import VlmReroute
    from ..loading import quiet_transformers

    quiet_transformers()
    model = VlmReroute(**{k: v for k, v in model_args.items() if v is not None})
    model.on_warning = warn  # lmms-eval's log would show it in its own format, among its INFO lines
    return model


def eval_command(
    model: Annotated[str, typer.Option(help="Hub id or local folder of a supported checkpoint")],
    tasks: Annotated[str, typer.Option(help="lmms-eval task names, comma-separated")],
    out: Annotated[Path, typer.Option(help="output folder (results.json, table.md/.csv, chart.png)")],
    methods: Annotated[
        str, typer.Option(help="methods, comma-separated (vanilla always runs)")
    ] = "fastv,pdrop",
    reroute: Annotated[str, typer.Option(help="both, on (reroute only) or off (prune only)")] = "both",
    tiers: Annotated[str, typer.Option(help="avg_T budgets, comma-separated")] = "192,128,64",
    limit: Annotated[int | None, typer.Option(help="samples per task (for a quick look)")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per generate() call")] = 1,
    data: Annotated[
        list[str] | None, typer.Option(help="dataset location for the shipped RefCOCO tasks, NAME=PATH_OR_ID")
    ] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option(help="extra lmms-eval task folders (win over shipped tasks)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    attn: Annotated[str, typer.Option(help="sdpa, eager or flash_attention_2")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available)")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Qwen: image resolution cap in pixels")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="override the tasks' generation length")] = None,
) -> None:
    """Evaluate methods × reroute on/off × tiers × tasks with lmms-eval; write a paper-style table."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        fail("lmms-eval is not installed: pip install 'vlm-reroute[eval]'")
    from ..eval.failures import EvalFailed
    from ..eval.grid import plan, run_grid
    from ..eval.report import markdown, write_reports
    from ..eval.tasks import TASK_DIR, write_task_dir

    if reroute not in REROUTE_MODES:
        fail(f"--reroute {reroute!r}: allowed are {', '.join(REROUTE_MODES)}")
    if batch_size < 1:
        fail(f"--batch-size {batch_size}: give a positive integer")
    try:
        cells = plan(
            _split(tasks, "tasks"),
            _split(methods, "methods"),
            REROUTE_MODES[reroute],
            _numbers(tiers, "tiers"),
        )
        locations = _datasets(data)
        task_dir = write_task_dir(out / "tasks", locations) if locations else TASK_DIR
    except ValueError as exc:
        fail(str(exc))
    model_args = {
        "pretrained": model,
        "dtype": dtype,
        "attn_implementation": attn,
        "device": device,
        "batch_size": batch_size,
        "max_pixels": max_pixels,
        "max_new_tokens": max_new_tokens,
    }
    settings = {**{k: v for k, v in model_args.items() if k != "device"}, "data": locations}

    def progress(cell, i, total):
        console.print(f"[bold]cell {i + 1}/{total}[/] {cell.task}: {cell.spec().label}", highlight=False)

    try:
        rows = run_grid(
            cells,
            out,
            lambda: _build_model(model_args),
            settings,
            limit=limit,
            include_path=[*(include_path or []), task_dir],  # lmms-eval: the first folder wins a name
            progress=progress,
        )
    except (ValueError, EvalFailed) as exc:  # EvalFailed: lmms-eval left no results (it raised)
        fail(str(exc))
    paths = write_reports(rows, out, title=f"{model}{f' (limit {limit})' if limit else ''}")
    console.print(markdown(rows), highlight=False)
    console.print(f"results: {out / 'results.json'}; " + ", ".join(f"{k}: {v}" for k, v in paths.items()))


app.command("eval")(eval_command)
