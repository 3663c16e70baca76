"""The published tiers beside ``vlm-reroute budget``'s rows: what each release runs at code level.

Published "64-token" settings are not comparable (``methods.md`` §2): SparseVLM v1.5's "64" averages
82.3 visual tokens per layer, DART's "64" 99.75, VisionZip's exactly 64. ``budget`` solves every method
for the budget asked and prints these beside its rows so nobody quotes a label as a budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..budget.published import STAGE_TIERS, code_level_tiers
from ..budget.rules import round_half_up


def published_tiers(key: str) -> list[dict[str, Any]]:
    """The method's published tiers as its release runs them (LLaVA-1.5-7B, 576 tokens, 32 layers):
    SparseVLM's "64" averages 82.3 visual tokens per layer at code level (``methods.md`` §2)."""
    return [
        {
            "variant": t.variant,
            "tier": t.tier,
            "layers": list(t.layers),
            "keep": list(t.keep),
            "recycled": list(t.recycled),
            "avg_t": t.avg_t,
        }
        for t in code_level_tiers(key)
    ]


def published_note(rows: Sequence[Any]) -> list[str]:
    """One line per method in the table whose published tiers run more tokens than their labels."""
    lines = []
    for key in dict.fromkeys(r.key for r in rows if r.key):
        tiers = code_level_tiers(key)
        if not tiers:
            continue
        by_variant: dict[str, list[str]] = {}
        for t in tiers:
            by_variant.setdefault(t.variant, []).append(f'"{t.tier}" {round_half_up(t.avg_t * 10) / 10:.1f}')
        name = next(r.name for r in rows if r.key == key)
        runs = "; ".join(f"{v}: {', '.join(items)}" for v, items in by_variant.items())
        lines.append(
            f"{name}'s published tiers run, at code level (LLaVA-1.5-7B, 576 tokens), avg_T {runs} "
            "(v1.5's recycled tokens included); the rows above solve its rule for the budget asked"
        )
    for key in dict.fromkeys(r.key for r in rows if r.key in STAGE_TIERS):
        how, stage_tiers = STAGE_TIERS[key]
        name = next(r.name for r in rows if r.key == key)
        runs = ", ".join(f'"{label}" {avg:.2f}'.rstrip("0").rstrip(".") for label, avg in stage_tiers)
        lines.append(f"{name}'s published tiers run avg_T {runs} at code level ({how}; methods.md §2)")
    return lines
