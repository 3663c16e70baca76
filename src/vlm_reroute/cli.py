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

from .budget import Budget, compute_budget, known_models, load_model_info, load_shape
from .solver import solve

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
    for method in ("fastv", "pdrop"):
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
    for col in (
        "method",
        "layers",
        "keep",
        "avg_T",
        "TFLOPs FastV",
        "TFLOPs exact",
        "KV MB",
        "-FLOPs",
        "-KV",
    ):
        table.add_column(col, justify="right" if col not in ("method", "layers", "keep") else "left")
    for name, b in rows:
        table.add_row(
            name,
            str(list(b.layers)) if b.layers else "-",
            str(list(b.keep)) if b.keep else "-",
            f"{b.avg_visual_tokens:.2f}",
            f"{b.flops_fastv / 1e12:.3f}",
            f"{b.flops_exact / 1e12:.3f}",
            f"{b.kv_bytes / 1e6:.1f}",
            f"{1 - b.flops_fastv_ratio:.0%}",
            f"{1 - b.kv_bytes_ratio:.0%}",
        )
    console.print(table)
    console.print(
        "FLOPs are multiply-accumulates of the decoder prefill (FastV: 4nd²+2n²d+2ndm; exact: GQA-aware, "
        "SwiGLU), n = text + visual tokens entering each layer. KV in MB (10^6 bytes).",
        style="dim",
    )


def main() -> None:  # pragma: no cover - console entry point
    app()
