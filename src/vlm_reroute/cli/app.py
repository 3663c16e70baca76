"""The ``vlm-reroute`` command: ``budget`` (offline arithmetic), ``run`` and ``bench``.

Errors a person will hit (unknown model, missing image, unreachable tier, no network) are
printed as one line and exit with status 1; heavy imports (torch, transformers) happen only in
the subcommands that load a model, so ``budget`` answers instantly.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..budget import Budget, compute_budget, known_models, load_model_info, load_shape
from ..budget.solver import solve, tabulated_methods

app = typer.Typer(
    help="Visual-token pruning and recoverable routing for Hugging Face VLMs.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Visual-token pruning and recoverable routing for Hugging Face VLMs."""


def fail(message: str) -> None:
    """One clear line and a non-zero exit, never a traceback."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def budget_rows(model: str, tier: float, n_text: int, n_visual: int | None) -> list[tuple[str, Budget]]:
    """Vanilla and the four methods, solved for avg_T = ``tier`` on ``model``."""
    shape = load_shape(model)
    if n_visual is None:
        n_visual = load_model_info(model).default_visual_tokens if model in known_models() else 576
    rows = [("vanilla", compute_budget(shape, n_visual, n_text))]
    for method in tabulated_methods():
        pair = solve(shape, n_visual, method, target_avg_t=tier, n_text=n_text)
        for sched in (pair.prune, pair.reroute):
            rows.append((sched.name, sched.budget(shape, n_text=n_text)))
    return rows


def budget_json(rows: list[tuple[str, Budget]]) -> list[dict]:
    return [
        {
            "method": name,
            "reroute": b.reroute,
            "layers": list(b.layers),
            "keep": list(b.keep),
            "avg_visual_tokens": b.avg_visual_tokens,
            "tflops": b.flops_fastv / 1e12,
            "tflops_pdrop": b.flops_pdrop / 1e12,
            "tflops_exact": b.flops_exact / 1e12,
            "kv_bytes": b.kv_bytes,
            "flops_ratio": b.flops_fastv_ratio,
            "kv_ratio": b.kv_bytes_ratio,
            "n_text": b.n_text,
            "n_visual": b.n_visual,
        }
        for name, b in rows
    ]


@app.command()
def budget(
    model: Annotated[
        str, typer.Option(help=f"shipped name ({', '.join(known_models())}) or a local model dir")
    ],
    tier: Annotated[float, typer.Option(help="target avg_T: mean visual tokens per decoder layer")] = 64,
    n_text: Annotated[int, typer.Option(help="text tokens in the prompt (counted in n)")] = 40,
    n_visual: Annotated[
        int | None, typer.Option(help="visual tokens per image (default: the model's)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (one object per method)")] = False,
) -> None:
    """Theoretical cost of every method at a tier: schedule, avg_T, TFLOPs, KV cache. Offline."""
    try:
        rows = budget_rows(model, tier, n_text, n_visual)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(budget_json(rows), indent=2))
        return
    base = rows[0][1]
    table = Table(title=f"{model}: avg_T = {tier:g}, n = {n_text} text + {base.n_visual} visual tokens")
    table.add_column("method", no_wrap=True)
    for col in ("layers", "keep"):
        table.add_column(col, overflow="fold")
    for col in ("avg_T", "TFLOPs", "KV MB", "FLOPs\nsaved", "KV\nsaved"):
        table.add_column(col, justify="right")
    for name, b in rows:
        table.add_row(
            name,
            ", ".join(map(str, b.layers)) or "-",
            ", ".join(map(str, b.keep)) or "-",
            f"{b.avg_visual_tokens:.1f}",
            f"{b.flops_fastv / 1e12:.3f}",
            f"{b.kv_bytes / 1e6:.1f}",
            f"{1 - b.flops_fastv_ratio:.0%}",
            f"{1 - b.kv_bytes_ratio:.0%}",
        )
    console.print(table)
    console.print(
        "TFLOPs: multiply-accumulates of the decoder prefill in FastV's convention 4nd²+2n²d+2ndm, "
        "n = text + visual tokens entering each layer (--json adds PyramidDrop's and an exact GQA-aware "
        "count). KV in MB (10^6 bytes) after prefill.",
        style="dim",
    )


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"--{what} {text!r}: give comma-separated integers, e.g. 2,7,15,23")
    return None


def _shape_and_image_tokens(model, inputs) -> tuple:
    """The decoder shape and the visual tokens of the first image: what tiers are solved for."""
    from ..adapters import adapter_for
    from ..budget import ModelShape

    ids = inputs["input_ids"]
    image_ids = adapter_for(model).image_ids(ids, inputs)
    return ModelShape.from_config(model.config), int((image_ids == 0).sum())


def build_method(model, inputs, method: str, reroute: bool, tier: float | None, layers, keep):
    """The method to run: explicit ``layers``/``keep``, else solved for avg_T = ``tier``."""
    from ..budget.solver import solve_schedule
    from ..methods import method_from_spec

    if (layers is None) != (keep is None):
        fail("--layers and --keep go together (or give neither and use --tier)")
    if layers is not None:
        return method_from_spec(method, reroute=reroute, layers=layers, keep=keep, model=model)
    shape, visual = _shape_and_image_tokens(model, inputs)
    return solve_schedule(shape, visual, method, reroute, target_avg_t=tier).to_method()


def _prefill(model, inputs) -> tuple[float, object]:
    import time

    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = model(**inputs, use_cache=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return time.perf_counter() - start, out.past_key_values


@app.command()
def run(
    model: Annotated[str, typer.Option(help="Hub id or local model folder")],
    image: Annotated[str, typer.Option(help="image path or http(s) URL")],
    prompt: Annotated[str, typer.Option(help="the question about the image")],
    method: Annotated[str, typer.Option(help="a registered method: fastv, pdrop, random")] = "pdrop",
    reroute: Annotated[bool, typer.Option("--reroute/--prune", help="recoverable routing or removal")] = True,
    tier: Annotated[float, typer.Option(help="target avg_T (visual tokens per layer) to solve for")] = 64,
    layers: Annotated[str | None, typer.Option(help="explicit decision layers, e.g. 2,7,15,23")] = None,
    keep: Annotated[str | None, typer.Option(help="explicit tokens kept per stage, e.g. 46,46,23,12")] = None,
    compare: Annotated[bool, typer.Option(help="also run vanilla and compare time, KV and answer")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    attn: Annotated[str, typer.Option(help="attention implementation: sdpa or eager")] = "sdpa",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Answer a question about an image with a routed model; show the decisions and the cost."""
    import torch

    from ..engine.cache import kv_bytes
    from ..loading import LoadError, PromptBuilder, load_image, load_model, quiet_transformers

    quiet_transformers()
    try:
        picture = load_image(image)
        loaded = load_model(model, dtype=dtype, device=device, attn=attn)
        builder = PromptBuilder.from_pretrained(model, loaded)
        inputs = builder(picture, prompt, loaded)
        chosen = build_method(
            loaded, inputs, method, reroute, tier, _parse_ints(layers, "layers"), _parse_ints(keep, "keep")
        )
        gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
        with chosen(loaded) as trace:
            seconds, cache = _prefill(loaded, inputs)
            with torch.no_grad():
                answer_ids = loaded.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1] :]
    except (LoadError, ValueError, TypeError) as exc:
        fail(str(exc))
    report = {
        "model": model,
        "method": chosen.name,
        "schedule": {
            "layers": [d.layer for d in trace.decisions],
            "keep": [d.kept[0] for d in trace.decisions],
        },
        "answer": builder.decode(answer_ids),
        "visual_tokens": trace.visual_tokens[0],
        "decisions": [
            {"layer": d.layer, "kept": d.kept[0], "reentered": d.reentered[0]} for d in trace.decisions
        ],
        "prefill_seconds": seconds,
        "kv_bytes": kv_bytes(cache),
    }
    if compare:
        base_seconds, base_cache = _prefill(loaded, inputs)
        with torch.no_grad():
            base_ids = loaded.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1] :]
        report["vanilla"] = {
            "answer": builder.decode(base_ids),
            "prefill_seconds": base_seconds,
            "kv_bytes": kv_bytes(base_cache),
        }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_run(report)


def _solved_methods(model, inputs, tier: float) -> dict:
    """Every tabulated method, prune and reroute, solved for avg_T = ``tier`` on this input."""
    shape, visual = _shape_and_image_tokens(model, inputs)
    pairs = [solve(shape, visual, method, target_avg_t=tier) for method in tabulated_methods()]
    return {s.name: s.to_method() for pair in pairs for s in (pair.prune, pair.reroute)}


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="Hub id or local model folder")],
    image: Annotated[str, typer.Option(help="image path or http(s) URL")],
    prompt: Annotated[str, typer.Option(help="the question")] = "Describe the image.",
    tier: Annotated[float, typer.Option(help="target avg_T for every method")] = 64,
    repeats: Annotated[int, typer.Option(help="timed repeats (median; interleaved A/B)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed warm-up rounds")] = 1,
    decode_tokens: Annotated[int, typer.Option(help="tokens for time per decode token (0: skip)")] = 8,
    ideal: Annotated[bool, typer.Option(help="also time the zero-overhead ideal (layers alone)")] = False,
    json_out: Annotated[str | None, typer.Option("--json", help="write the report as JSON here")] = None,
    plots: Annotated[str | None, typer.Option(help="folder for the PNG plots")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    attn: Annotated[str, typer.Option(help="sdpa or eager")] = "sdpa",
) -> None:
    """Measured cost: prefill time, decode time, memory and KV of vanilla and every method."""
    from pathlib import Path

    from ..bench.plots import speedup_png, tokens_per_layer_png
    from ..bench.profiler import profile
    from ..loading import LoadError, PromptBuilder, load_image, load_model, quiet_transformers

    quiet_transformers()
    try:
        picture = load_image(image)
        loaded = load_model(model, dtype=dtype, device=device, attn=attn)
        inputs = PromptBuilder.from_pretrained(model, loaded)(picture, prompt, loaded)
        methods = _solved_methods(loaded, inputs, tier)
        report = profile(
            loaded, inputs, methods, repeats=repeats, warmup=warmup, decode_tokens=decode_tokens, ideal=ideal
        )
    except (LoadError, ValueError, TypeError) as exc:
        fail(str(exc))
    console.print(report.table())
    if json_out:
        Path(json_out).write_text(report.to_json())
        console.print(f"JSON: {json_out}")
    if plots:
        folder = Path(plots)
        folder.mkdir(parents=True, exist_ok=True)
        for png in (
            tokens_per_layer_png(report, folder / "tokens_per_layer.png"),
            speedup_png(report, folder / "speedup.png"),
        ):
            console.print(f"plot: {png}")


def _print_run(report: dict) -> None:
    console.print(
        f"[bold]{report['method']}[/] on {report['model']}: {report['visual_tokens']} visual tokens"
    )
    console.print(f"[bold]answer:[/] {report['answer']}")
    table = Table(title="decisions (sample 0)")
    for col in ("layer", "kept", "re-entered"):
        table.add_column(col, justify="right")
    for d in report["decisions"]:
        table.add_row(str(d["layer"]), str(d["kept"]), str(d["reentered"]))
    console.print(table)
    line = f"prefill {report['prefill_seconds'] * 1e3:.1f} ms, KV cache {report['kv_bytes'] / 1e6:.2f} MB"
    if "vanilla" in report:
        v = report["vanilla"]
        kv_ratio = report["kv_bytes"] / v["kv_bytes"]
        time_ratio = report["prefill_seconds"] / v["prefill_seconds"]
        line += (
            f" | vanilla {v['prefill_seconds'] * 1e3:.1f} ms, {v['kv_bytes'] / 1e6:.2f} MB "
            f"(KV {kv_ratio:.0%}, time {time_ratio:.0%})"
        )
        console.print(f"[bold]vanilla answer:[/] {v['answer']}")
    console.print(line)


from . import explain as _explain  # noqa: E402, F401  (registers the `explain` command)
