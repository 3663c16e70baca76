"""``vlm-reroute budget``: the theoretical cost of every method at a budget. Offline, torch-free, < 1 s.

A method that cannot reach the budget is still shown, marked, with its reachable range and the
nearest reachable schedule (the one ``run`` and ``bench`` would use); ``--strict`` makes that an
error instead.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from ..budget import Budget, ModelShape, compute_budget, known_models, load_model_info, load_shape
from ..budget.solver import (
    SolvedSchedule,
    solve_for_target,
    solve_schedule,
    stage_one_methods,
    tabulated_methods,
)
from ..budget.target import BudgetTarget
from ..families import family_of_model_type
from .app import (
    AsJson,
    FlopsFraction,
    Output,
    Ratio,
    Strict,
    Tier,
    WithdrawAt,
    app,
    budget_spec,
    check_output,
    describe_budget,
    fail,
    print_json,
    withdraw_option,
    write_json,
)
from .budget_notes import published_note, published_tiers

_UNITS = ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1.0, "FLOPs"))


@dataclass(frozen=True)
class ModelFacts:
    """A decoder shape and the visual tokens per image the table assumes (and why)."""

    label: str
    shape: ModelShape
    n_visual: int | None
    note: str


def hub_ids() -> dict[str, str]:
    """Hub id (lower case) → shipped name, so ``llava-hf/llava-1.5-7b-hf`` finds ``llava-1.5-7b``."""
    return {load_model_info(name).hub_id.lower(): name for name in known_models()}


def model_facts(model: str) -> ModelFacts:
    """A shipped name, the Hub id of a shipped shape, or a local VLM folder / config.json."""
    name = model if model in known_models() else hub_ids().get(model.lower())
    if name is not None:
        info = load_model_info(name)
        return ModelFacts(name, info.shape, info.default_visual_tokens, info.visual_tokens_note)
    path = Path(model).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        fail(
            f"unknown model {model!r}: not a shipped shape ({', '.join(known_models())}), the Hub id of one "
            f"({', '.join(load_model_info(n).hub_id for n in known_models())}), nor a local folder with a "
            "config.json"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        fail(f"cannot read {str(config_file)!r}: {exc}")
    if not isinstance(config, dict) or "vision_config" not in config:
        kind = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else "?"
        fail(
            f"{model!r} is a text-only model ({kind or 'no architectures'}, no vision_config): "
            "budget needs a vision-language model"
        )
    try:
        shape = load_shape(path)
    except ValueError as exc:
        fail(f"{model!r}: {exc}")
    n_visual, note = _folder_visual_tokens(config, config_file.parent)
    return ModelFacts(model, shape, n_visual, note)


def _folder_visual_tokens(config: dict[str, Any], folder: Path) -> tuple[int | None, str]:
    """Visual tokens per image from a local folder: a fixed patch grid (LLaVA-1.5), else the processor's
    pixel cap (Qwen)."""
    vision = config.get("vision_config") or {}
    family = family_of_model_type(config.get("model_type"))
    fixed = family is not None and family.fixed_grid
    if fixed and vision.get("image_size") and vision.get("patch_size"):
        side = vision["image_size"] // vision["patch_size"]
        extra = 1 if config.get("vision_feature_select_strategy") == "full" else 0
        return side * side + extra, f"{side}x{side} patches of the vision tower (fixed)"
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text(encoding="utf-8"))
        cap = data.get("max_pixels") or (data.get("size") or {}).get("longest_edge")
        patch, merge = data.get("patch_size"), data.get("merge_size")
        if cap and patch and merge:
            tokens = int(cap) // (patch * merge) ** 2
            return (
                tokens,
                f"the largest image the processor allows (max_pixels={cap}); smaller images give fewer",
            )
    return None, ""


@dataclass(frozen=True)
class Row:
    name: str
    budget: Budget
    reachable: bool
    asked: float | None
    avg_range: tuple[float, float] | None
    flops_range: tuple[float, float] | None
    reason: str | None
    key: str = ""  # registry key ("" for vanilla)

    @property
    def note(self) -> str | None:
        if self.reason is None:
            return None
        return (
            f"{self.reason}; the row shows the nearest reachable schedule "
            f"(avg_T {self.budget.avg_visual_tokens:.2f}), which run and bench use"
        )


def _solved(
    shape: ModelShape, n: int, key: str, reroute: bool, target: BudgetTarget, n_text: int, vtw: int | None
) -> SolvedSchedule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return solve_for_target(shape, n, key, reroute, target, None, n_text, vtw)


def method_row(
    shape: ModelShape, n_visual: int, n_text: int, key: str, reroute: bool, spec: dict[str, float],
    withdraw_at: int | None = None,
) -> Row:  # fmt: skip
    """One method solved for ``spec`` (with VTW's ``withdraw_at``: no visual token from that layer on);
    unreachable budgets get the nearest reachable schedule."""
    target = BudgetTarget(
        avg_t=spec.get("tier"), ratio=spec.get("ratio"), flops_fraction=spec.get("flops_fraction")
    )
    low = _solved(shape, n_visual, key, reroute, BudgetTarget(avg_t=1e-9), n_text, withdraw_at)
    high = _solved(shape, n_visual, key, reroute, BudgetTarget(avg_t=1e9), n_text, withdraw_at)
    low_b, high_b = low.budget(shape, n_text=n_text), high.budget(shape, n_text=n_text)
    avg_range = (low.avg_t, high.avg_t)
    flops_range = (low_b.flops_pdrop_ratio, high_b.flops_pdrop_ratio)
    asked = target.avg_t_for(n_visual)
    try:
        if asked is not None:
            solved = solve_schedule(shape, n_visual, key, reroute, avg_t=asked, withdraw_at=withdraw_at)
        else:
            solved = solve_schedule(
                shape, n_visual, key, reroute, flops_fraction=target.flops_fraction, n_text=n_text,
                withdraw_at=withdraw_at,
            )  # fmt: skip
        reachable, reason = True, None
    except ValueError:
        solved, reachable = _solved(shape, n_visual, key, reroute, target, n_text, withdraw_at), False
        if asked is not None:
            what = f"asks avg_T {asked:.2f}; reachable avg_T {avg_range[0]:.2f}..{avg_range[1]:.2f}"
        else:
            what = f"reachable FLOPs fraction {flops_range[0]:.3f}..{flops_range[1]:.3f}"
        reason = f"{solved.name}: {describe_budget(spec)} is not reachable ({what})"
    budget = solved.budget(shape, n_text=n_text)
    return Row(solved.name, budget, reachable, asked, avg_range, flops_range, reason, key)


def budget_rows(
    facts: ModelFacts, n_visual: int, n_text: int, spec: dict[str, float], withdraw_at: int | None = None
) -> list[Row]:
    """Vanilla (never withdrawn: the reference) and every tabulated method, prune and reroute."""
    rows = [Row("vanilla", compute_budget(facts.shape, n_visual, n_text), True, None, None, None, None)]
    for key in tabulated_methods():
        for reroute in (False, True):
            rows.append(method_row(facts.shape, n_visual, n_text, key, reroute, spec, withdraw_at))
    for key in stage_one_methods():  # one row: alone, their reroute form runs what prune runs
        rows.append(method_row(facts.shape, n_visual, n_text, key, False, spec, withdraw_at))
    return rows


def rows_json(rows: list[Row], spec: dict[str, float]) -> list[dict[str, Any]]:
    return [
        {
            "method": r.name,
            "reroute": r.budget.reroute,
            "budget": spec if r.name != "vanilla" else None,
            "reachable": r.reachable,
            "asked_avg_t": r.asked,
            "reachable_avg_t": list(r.avg_range) if r.avg_range else None,
            "reachable_flops_fraction": list(r.flops_range) if r.flops_range else None,
            "note": r.note,
            "layers": list(r.budget.layers),
            "keep": list(r.budget.keep),
            "avg_visual_tokens": r.budget.avg_visual_tokens,
            "withdraw_at": r.budget.withdraw_at,
            "tflops": r.budget.flops_fastv / 1e12,
            "tflops_pdrop": r.budget.flops_pdrop / 1e12,
            "tflops_exact": r.budget.flops_exact / 1e12,
            "kv_bytes": r.budget.kv_bytes,
            "flops_ratio": r.budget.flops_fastv_ratio,
            "flops_pdrop_ratio": r.budget.flops_pdrop_ratio,
            "kv_ratio": r.budget.kv_bytes_ratio,
            "n_text": r.budget.n_text,
            "n_visual": r.budget.n_visual,
            "published_tiers": published_tiers(r.key),
        }
        for r in rows
    ]


def _number(value: float) -> str:
    """Four significant digits at most, at a fixed number of decimals per magnitude."""
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 10 else f"{value:.3f}"


def flops_unit(value: float) -> tuple[float, str]:
    """The largest unit in which ``value`` is at least 1: TFLOPs for 7B models, GFLOPs for small ones."""
    return next((scale, name) for scale, name in _UNITS if value >= scale or scale == 1.0)


@app.command()
def budget(
    model: Annotated[
        str,
        typer.Option(help=f"shipped shape ({', '.join(known_models())}), its Hub id, or a local VLM folder"),
    ],
    tier: Tier = None,
    ratio: Ratio = None,
    flops_fraction: FlopsFraction = None,
    strict: Strict = False,
    withdraw_at: WithdrawAt = None,
    n_text: Annotated[int, typer.Option(min=0, help="text tokens in the prompt (counted in n)")] = 40,
    n_visual: Annotated[
        int | None, typer.Option(min=1, help="visual tokens per image (default: the model's)")
    ] = None,
    as_json: AsJson = False,
    output: Output = None,
) -> None:
    """Theoretical cost of every method at a budget: schedule, avg_T, FLOPs, KV cache. Offline."""
    output = check_output(output)
    spec = budget_spec(tier, ratio, flops_fraction, strict, explicit_keep=False)
    withdraw_option(withdraw_at)  # a layer index, before the model is read
    facts = model_facts(model)
    withdraw_at = withdraw_option(withdraw_at, facts.shape.num_layers)
    if n_visual is None:
        if facts.n_visual is None:
            fail(f"{model!r}: cannot tell how many visual tokens an image gives; pass --n-visual")
        n_visual, note = facts.n_visual, facts.note
    else:
        note = "--n-visual"
    rows = budget_rows(facts, n_visual, n_text, spec, withdraw_at)
    missed = [r for r in rows if not r.reachable]
    if strict and missed:
        fail("; ".join(r.reason for r in missed if r.reason is not None))  # every missed row has one
    data = rows_json(rows, spec)
    write_json(output, data)
    if as_json:
        print_json(data)
        return
    _print_table(facts.label, rows, spec, n_text, n_visual, note)


def _print_table(
    label: str, rows: list[Row], spec: dict[str, float], n_text: int, n_visual: int, note: str
) -> None:
    console = Console(highlight=False)
    scale, unit = flops_unit(rows[0].budget.flops_fastv)
    at = rows[-1].budget.withdraw_at
    vtw = f"; no visual token from layer {at} on (VTW)" if at is not None else ""
    console.print(f"{label}: {describe_budget(spec)}, n = {n_text} text + {n_visual} visual tokens{vtw}")
    headers = ("method", "layers", "keep", "avg_T", unit, "KV MB", "FLOPs\nsaved", "KV\nsaved")
    cells = _fitted_cells(headers, rows, scale, console.width)
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold underline")
    for i, header in enumerate(headers):  # no_wrap everywhere: rich would cut a value short to fit
        table.add_column(header, justify="right" if i >= 3 else "left", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    width = _table_width(headers, cells)
    # narrower than even the broken lists need: wider than the console (the terminal wraps), never cut
    (console if width <= console.width else Console(highlight=False, width=width)).print(table)
    if note:
        console.print(f"visual tokens per image: {note}")
    for line in published_note(rows):
        console.print(line)
    for r in rows:
        if not r.reachable:
            console.print(f"* {r.note}; --strict makes this an error")
    console.print(
        f"{unit}: multiply-accumulates of the decoder prefill in FastV's convention 4nd²+2n²d+2ndm, "
        "n = text + visual tokens entering each layer (--json adds PyramidDrop's and an exact GQA-aware "
        "count). KV in MB (10^6 bytes) after prefill.",
        style="dim",
    )


def _items(values: tuple[int, ...], width: int | None) -> str:
    """``2,7,15,23``, broken after a comma into lines of at most ``width`` characters when given,
    never inside a number (a longer number gets a line of its own)."""
    pieces = [f"{v}," for v in values[:-1]] + [str(v) for v in values[-1:]]
    lines = [""]
    for piece in pieces:
        if width is not None and lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines) or "-"


def _cells(rows: list[Row], scale: float, list_widths: tuple[int | None, int | None]) -> list[list[str]]:
    return [
        [
            r.name + ("" if r.reachable else " *"),
            _items(r.budget.layers, list_widths[0]),
            _items(r.budget.keep, list_widths[1]),
            f"{r.budget.avg_visual_tokens:.1f}",
            _number(r.budget.flops_fastv / scale),
            f"{r.budget.kv_bytes / 1e6:.1f}",
            f"{1 - r.budget.flops_fastv_ratio:.0%}",
            f"{1 - r.budget.kv_bytes_ratio:.0%}",
        ]
        for r in rows
    ]


def _column_widths(headers: tuple[str, ...], cells: list[list[str]]) -> list[int]:
    columns = zip(headers, *cells, strict=True)
    return [max(cell_len(line) for cell in column for line in cell.split("\n")) for column in columns]


def _table_width(headers: tuple[str, ...], cells: list[list[str]]) -> int:
    return sum(_column_widths(headers, cells)) + 2 * (len(headers) - 1)  # padding (0, 1), no edges


def _fitted_cells(headers: tuple[str, ...], rows: list[Row], scale: float, width: int) -> list[list[str]]:
    """The table's cells, the layer and keep lists broken after commas as far as needed to fit
    ``width`` (numbers are never shortened: the issue with rich's own fitting, which cuts ``576.0``
    to ``576…``); the lists give up room in proportion to their length, down to their header."""
    cells = _cells(rows, scale, (None, None))
    excess = _table_width(headers, cells) - width
    if excess <= 0:
        return cells
    natural = _column_widths(headers, cells)[1:3]
    floor = [
        max(len(headers[1 + i]), *(len(f"{v},") for r in rows for v in getattr(r.budget, name)))
        for i, name in enumerate(("layers", "keep"))
    ]
    room = max(sum(floor), sum(natural) - excess)
    first = max(floor[0], min(natural[0], room * natural[0] // sum(natural)))
    return _cells(rows, scale, (first, max(floor[1], room - first)))
