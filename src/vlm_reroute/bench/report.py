"""What the profiler measured, as data (JSON round trip) and as tables that fit 80 columns.

``ProfileReport.to_dict()`` holds ``model``, ``inputs``, ``settings``, ``environment``,
``outside_decoder_s`` and ``rows``; each row has the keys of :class:`ProfileRow`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .stats import WIDE_SPREAD, Spread, spread

__all__ = ["VANILLA", "ProfileReport", "ProfileRow"]

VANILLA = "vanilla"


@dataclass
class ProfileRow:
    """One configuration of a profile. Times in seconds, memory in bytes; ratios are to vanilla's row.

    Every time is the median of its runs (``prefill_runs_s``, ``decode_runs_s_per_token``,
    ``ideal_runs_s``) with the quartiles beside it (``*_iqr*``: ``[q1, q3]``). Every ratio is a
    ratio of medians with the range the quartiles allow (``*_range``: ``[low, high]``, see
    :func:`~vlm_reroute.bench.stats.ratio`): ``speedup`` = vanilla / this prefill,
    ``ideal_speedup`` = vanilla / ideal, ``ideal_fraction`` = ideal / measured (1: no router
    overhead). ``ideal_runs_s[r]`` = vanilla's time outside the decoder layers in repeat r + every
    layer timed alone on its token count right after this configuration's run r
    (``ideal_layer_s``: per-layer medians). ``theoretical_speedup`` = 1 / ``flops_ratio`` (GQA-aware
    exact MACs of the decoder layers, n = text + visual); ``efficiency`` = speedup / theoretical.
    ``kv_lengths`` are per layer (per sample, padding and fillers included; ``None`` at a hybrid
    decoder's linear-attention layers, which cache a fixed-size state); ``kv_tokens`` sums them over
    layers × batch and ``kv_bytes`` is what the cache tensors hold. ``*_theory`` come from
    :func:`~vlm_reroute.budget.compute_budget` for sample 0 × batch (``None`` for padded batches or
    images of different sizes; KV over the attention layers only; no FLOPs theory for a hybrid
    decoder, whose formulas would price softmax attention in its linear-attention layers).
    ``visual_tokens_per_layer`` and ``reentered`` are sample 0's.

    References
    ----------
    FLOPs are counted as multiply-accumulates of the decoder layers, as in FastV (arXiv 2403.06764,
    Eq. 5) and PyramidDrop (arXiv 2410.17247); ``flops_ratio_pdrop`` is PyramidDrop's own formula
    (docs/budgets.md).
    """

    name: str
    method: str
    reroute: bool
    layers: list[int]
    keep: list[int]
    prefill_s: float
    prefill_iqr_s: list[float]
    prefill_runs_s: list[float]
    speedup: float
    speedup_range: list[float]
    decode_s_per_token: float | None
    decode_iqr_s_per_token: list[float] | None
    decode_runs_s_per_token: list[float]
    peak_rss_bytes: int | None
    peak_rss_increase_bytes: int | None
    cuda_peak_bytes: int | None
    kv_lengths: list[int | None]
    kv_tokens: int
    kv_bytes: int
    kv_tokens_theory: int | None
    kv_bytes_theory: int | None
    visual_tokens_per_layer: list[int]
    reentered: list[int]
    avg_visual_tokens: float
    flops_ratio: float | None
    flops_ratio_pdrop: float | None
    theoretical_speedup: float | None
    efficiency: float | None
    ideal_prefill_s: float | None = None
    ideal_iqr_s: list[float] | None = None
    ideal_runs_s: list[float] | None = None
    ideal_layer_s: list[float] | None = None
    ideal_speedup: float | None = None
    ideal_speedup_range: list[float] | None = None
    ideal_fraction: float | None = None
    ideal_fraction_range: list[float] | None = None

    @property
    def prefill(self) -> Spread:
        return spread(self.prefill_runs_s)


@dataclass
class ProfileReport:
    """A whole profile: rows (``vanilla`` first) plus what was run where.

    The model, inputs, settings and machine travel with the rows so that a JSON file stands on its
    own (``vlm-reroute bench --output``).
    """

    rows: list[ProfileRow]
    model: dict[str, Any]
    inputs: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    outside_decoder_s: float | None = None

    def row(self, name: str) -> ProfileRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def title(self) -> str:
        inputs, model, env = self.inputs, self.model, self.environment
        return (
            f"{model['class']}: {inputs['seq_len']} tokens ({inputs['visual_tokens']} visual), batch "
            f"{inputs['batch']}, {model['dtype']} {model['attn_implementation']} on {model['device']}, "
            f"{_threads(env.get('torch_threads'))}; median (q1–q3) of {self.settings['repeats']} "
            f"interleaved runs after {self.settings['warmup']} warm-up"
        )

    def table(self) -> Table:
        """Prefill times and speedups (median, quartiles), FLOPs speedup and KV: fits 80 columns."""
        table = _table("method", "prefill ms", "speedup", "FLOPs", "KV MiB")
        for r in self.rows:
            table.add_row(
                r.name,
                r.prefill.text(1e3),
                _ratio_text(r.speedup, r.speedup_range),
                _fmt(r.theoretical_speedup, 1, ".2f", "×"),
                f"{r.kv_bytes / 2**20:.2f}",
            )
        return table

    def detail_tables(self) -> list[Table]:
        """The ideal router's columns, then decode and memory, for the measurements that were made."""
        tables = []
        if any(r.ideal_runs_s for r in self.rows):
            table = _table("method", "ideal ms", "ideal speedup", "ideal/measured")
            for r in self.rows:
                table.add_row(
                    r.name,
                    spread(r.ideal_runs_s).text(1e3) if r.ideal_runs_s else "—",
                    _ratio_text(r.ideal_speedup, r.ideal_speedup_range),
                    _ratio_text(r.ideal_fraction, r.ideal_fraction_range, ".2f", ""),
                )
            tables.append(table)
        decode = any(r.decode_runs_s_per_token for r in self.rows)
        memory = any(r.peak_rss_bytes is not None for r in self.rows)
        if decode or memory:
            table = _table("method", *(["decode ms/token"] * decode), *(["peak RSS MiB"] * memory))
            for r in self.rows:
                cells = [r.name]
                if decode:
                    runs = r.decode_runs_s_per_token
                    cells.append(spread(runs).text(1e3, ".2f") if runs else "—")
                if memory:
                    cells.append(_fmt(r.peak_rss_bytes, 2**-20, ".0f"))
                table.add_row(*cells)
            tables.append(table)
        return tables

    def spread_warning(self, threshold: float = WIDE_SPREAD) -> str | None:
        """One line naming the configurations whose prefill times spread too wide to trust."""
        wide = [(r.name, r.prefill.relative) for r in self.rows if r.prefill.relative > threshold]
        if not wide:
            return None
        names = ", ".join(f"{name} {rel:.0%}" for name, rel in wide)
        fewer = ", or try --threads 1" if (self.environment.get("torch_threads") or 1) > 1 else ""
        return (
            f"prefill times spread wider than {threshold:.0%} of the median (interquartile range: "
            f"{names}); the machine was busy: close other work or raise --repeats{fewer}"
        )

    def print(self, console: Console) -> None:
        console.print(self.title(), highlight=False)
        console.print(self.table())
        for table in self.detail_tables():
            console.print(table)


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if i else "left", no_wrap=True)
    return table


def _ratio_text(value: float | None, bounds: list[float] | None, spec: str = ".2f", unit: str = "×") -> str:
    if value is None:
        return "—"
    if bounds is None or bounds[0] == bounds[1] == value:
        return f"{value:{spec}}{unit}"
    return f"{value:{spec}}{unit} ({bounds[0]:{spec}}–{bounds[1]:{spec}})"


def _threads(n: int | None) -> str:
    return f"{n} thread{'s' * (n != 1)}" if n else "? threads"


def _fmt(value: float | None, scale: float, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value * scale:{spec}}{suffix}"
