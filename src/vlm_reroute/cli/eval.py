"""``vlm-reroute eval``: a grid of methods × reroute on/off × tiers × tasks through lmms-eval, with a table.

Needs the ``eval`` extra (``pip install "vlm-reroute[eval]"``). Resumable: run the same command again
and finished cells are skipped. An unknown task, or a cell lmms-eval returns no results for (lmms-eval
itself would log the error and carry on), is one ``error:`` line and exit status 1.

``--preset paper-main|ablation`` picks the paper's tasks in the checkpoint's family's variants (the family
comes from the checkpoint's ``config.json``: :mod:`vlm_reroute.families`); ``--dry-run`` lists them (for
every family when no model is given) without loading anything. ``--processes N`` runs lmms-eval's data
parallelism under ``accelerate launch`` (:mod:`vlm_reroute.eval.parallel`).
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


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in _split(text, "layers")]
    except ValueError:
        fail(f"--layers {text!r}: give comma-separated decoder layer indices, e.g. 3,7,11")
    return None


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


def _demo_model(model: str | None) -> str | None:
    """``--model demo``: the shipped demo checkpoint (one ``error:`` line when this install has none)."""
    if model != "demo":
        return model
    from .demo import _model_folder

    return _model_folder(None)


def _demo_tasks(cells: list[Any], out: Path) -> list[Path]:
    """The demo tasks' folder (scenes drawn locally, as ``vlm-reroute demo`` draws them) when a cell
    runs one of them; no folder otherwise."""
    from ..eval.tasks.demo_scenes import TASKS

    if not any(cell.task in TASKS for cell in cells):
        return []
    from ..demo.tasks import write_tasks

    return [write_tasks(out / "tasks-demo")]


def _build_model(model_args: dict[str, Any]) -> Any:
    """The lmms-eval model, loaded once for the whole grid; a clamped budget is one ``warning:`` line."""
    from ..eval.model import VlmReroute
    from ..loading import quiet_transformers

    quiet_transformers()
    model = VlmReroute(**{k: v for k, v in model_args.items() if v is not None})
    model.on_warning = warn  # lmms-eval's log would show it in its own format, among its INFO lines
    return model


def _task_list(model: str | None, tasks: str | None, preset: str | None) -> list[str]:
    """``--tasks``, after the preset's tasks for the checkpoint's family (duplicates dropped)."""
    from ..eval.presets import preset_tasks
    from ..families import family_of_checkpoint

    chosen: list[str] = []
    if preset is not None:
        try:
            chosen = preset_tasks(preset, family_of_checkpoint(str(model)).name)
        except (ValueError, OSError) as exc:
            fail(str(exc))
    chosen += _split(tasks, "tasks") if tasks is not None else []
    if not chosen:
        fail("give --tasks (comma-separated lmms-eval task names) or --preset (paper-main, ablation)")
    return list(dict.fromkeys(chosen))


def _dry_run(model: str | None, tasks: str | None, preset: str | None, cells: int | None) -> None:
    """Print the tasks (per family with a preset and no model) and the number of cells; load nothing."""
    from ..eval.presets import describe
    from ..families import family_of_checkpoint

    if model is None:
        if preset is None:
            fail("--dry-run without --model lists a --preset's tasks for every family; give --preset")
        console.print(describe(preset), highlight=False, soft_wrap=True)
        return
    try:
        family = family_of_checkpoint(model)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    listed = _task_list(model, tasks, preset)
    console.print(f"{model}: family {family.name} ({family.label})", highlight=False, soft_wrap=True)
    console.print(f"tasks ({len(listed)}): {', '.join(listed)}", highlight=False, soft_wrap=True)
    console.print(f"cells: {cells}", highlight=False)


def _relaunch(params: dict[str, Any], processes: int) -> None:
    """Re-run this command as ``processes`` data-parallel ranks (same options); exit with their status."""
    from ..eval.parallel import relaunch

    args = ["eval"]
    for name, value in params.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            args += [flag] if item is True else [flag, str(item)]
    code = relaunch(processes, args)
    if code != 0:
        fail(f"the {processes} data-parallel processes exited with status {code}; see their log above")


def eval_command(
    out: Annotated[
        Path | None, typer.Option(help="output folder (results.json, table.md/.csv, chart.png)")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Hub id or local folder of a supported checkpoint; demo: the shipped demo model"),
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="lmms-eval task names, comma-separated")] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="paper-main (POPE + 8 RefCOCO splits) or ablation, in the family's variants"),
    ] = None,
    methods: Annotated[
        str, typer.Option(help="methods, comma-separated (vanilla always runs)")
    ] = "fastv,pdrop",
    reroute: Annotated[str, typer.Option(help="both, on (reroute only) or off (prune only)")] = "both",
    tiers: Annotated[str, typer.Option(help="avg_T budgets, comma-separated")] = "192,128,64",
    layers: Annotated[
        str | None, typer.Option(help="decision layers the tiers are solved on, e.g. 3,7,11 (Qwen3.5)")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="samples per task (for a quick look)")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per generate() call")] = 1,
    processes: Annotated[int, typer.Option(help="data-parallel processes (accelerate launch)")] = 1,
    data: Annotated[
        list[str] | None, typer.Option(help="dataset location for the shipped RefCOCO tasks, NAME=PATH_OR_ID")
    ] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option(help="extra lmms-eval task folders (win over shipped tasks)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    attn: Annotated[str, typer.Option(help="sdpa, eager or flash_attention_2")] = "sdpa",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available)")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="image resolution cap of the Qwen families")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="override the tasks' generation length")] = None,
    dry_run: Annotated[bool, typer.Option(help="list the tasks and cells, run nothing")] = False,
) -> None:
    """Evaluate methods × reroute on/off × tiers × tasks with lmms-eval; write a paper-style table."""
    model = _demo_model(model)
    params = {k: v for k, v in locals().items()}
    from ..eval.grid import plan

    if reroute not in REROUTE_MODES:
        fail(f"--reroute {reroute!r}: allowed are {', '.join(REROUTE_MODES)}")
    if batch_size < 1 or processes < 1:
        fail(f"--batch-size {batch_size} / --processes {processes}: give positive integers")
    if dry_run and model is None:
        return _dry_run(None, tasks, preset, None)
    if model is None or (out is None and not dry_run):
        fail("give --model and --out (or --dry-run --preset NAME to list a preset's tasks per family)")
    try:
        grid_layers = _layers(layers)
        cells = plan(
            _task_list(model, tasks, preset),
            _split(methods, "methods"),
            REROUTE_MODES[reroute],
            _numbers(tiers, "tiers"),
            grid_layers,
        )
    except ValueError as exc:
        fail(str(exc))
    if dry_run:
        return _dry_run(model, tasks, preset, len(cells))
    from ..eval.parallel import launched

    if processes > 1 and not launched(processes):
        return _relaunch({k: v for k, v in params.items() if k != "dry_run"}, processes)
    _run(cells, params, grid_layers)


def _run(cells: list[Any], params: dict[str, Any], grid_layers: list[int] | None) -> None:
    """Run the grid in this process (one rank of a data-parallel run, or all of it) and write the reports."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        fail("lmms-eval is not installed: pip install 'vlm-reroute[eval]'")
    from ..eval.failures import EvalFailed
    from ..eval.grid import run_grid
    from ..eval.parallel import world
    from ..eval.report import markdown, write_reports
    from ..eval.tasks import TASK_DIR, write_task_dir

    out: Path = params["out"]
    rank = world()[0]
    try:
        locations = _datasets(params["data"])
        # each rank writes its own copy: no rank reads a folder another is still writing
        task_dir = (
            write_task_dir(out / ("tasks" if rank == 0 else f"tasks.rank{rank}"), locations)
            if locations
            else TASK_DIR
        )
    except ValueError as exc:
        fail(str(exc))
    names = ("dtype", "batch_size", "max_pixels", "max_new_tokens")
    model_args = {
        "pretrained": params["model"],
        "attn_implementation": params["attn"],
        "device": params["device"],
    }
    model_args.update({k: params[k] for k in names})
    settings = {**{k: v for k, v in model_args.items() if k != "device"}, "data": locations}
    if grid_layers:
        settings["layers"] = grid_layers

    def progress(cell, i, total):
        if rank == 0:
            console.print(f"[bold]cell {i + 1}/{total}[/] {cell.task}: {cell.spec().label}", highlight=False)

    try:
        rows = run_grid(
            cells,
            out,
            lambda: _build_model(model_args),
            settings,
            limit=params["limit"],
            # lmms-eval: the first folder wins
            include_path=[*(params["include_path"] or []), *_demo_tasks(cells, out), task_dir],
            progress=progress,
        )
    except (ValueError, EvalFailed) as exc:  # EvalFailed: lmms-eval left no results (it raised)
        fail(str(exc))
    if rank != 0:
        return
    limit = params["limit"]
    paths = write_reports(rows, out, title=f"{params['model']}{f' (limit {limit})' if limit else ''}")
    console.print(markdown(rows), highlight=False)
    console.print(f"results: {out / 'results.json'}; " + ", ".join(f"{k}: {v}" for k, v in paths.items()))


app.command("eval")(eval_command)
