"""What to run, as lmms-eval's ``--model_args`` give it: a method name and its budget, parsed and checked.

Torch-free: the grid runner and the manifest use it without loading a model. lmms-eval passes every
value as a string unless it looks like a bool or a number (``layers=[2,7,15,23]`` arrives as the
string ``"[2,7,15,23]"``), so lists are accepted as JSON (``[2,7,15,23]``) or ``;``-separated
(``2;7;15;23``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METHODS = ("none", "fastv", "pdrop")
_DISPLAY = {"none": "vanilla", "fastv": "FastV", "pdrop": "PDrop"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value: Any, what: str) -> bool:
    """``True``/``False`` or their usual spellings; anything else is an error naming ``what``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{what}={value!r}: give true or false")


def parse_number(value: Any, what: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}={value!r}: give a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r}: give a number") from None


def parse_list(value: Any, what: str, integer: bool) -> tuple[int | float, ...] | None:
    """A list from a Python sequence, a JSON list string, a ``;``-separated string or a single number."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    items: Sequence[Any]
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = json.loads(text) if text.startswith("[") else [x for x in text.split(";") if x.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{what}={value!r}: give a list such as [2,7,15,23] or 2;7;15;23") from None
        items = parsed if isinstance(parsed, list) else [parsed]
    elif isinstance(value, Sequence):
        items = value
    else:
        items = [value]
    out: list[int | float] = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{what}={value!r}: {item!r} is not a number") from None
        if integer or number.is_integer() and not (isinstance(item, float) or "." in str(item)):
            if not number.is_integer():
                raise ValueError(f"{what}={value!r}: {item!r} is not an integer")
            out.append(int(number))
        else:
            out.append(number)
    if not out:
        raise ValueError(f"{what}={value!r}: the list is empty")
    return tuple(out)


@dataclass(frozen=True)
class MethodSpec:
    """A method and its budget: ``tier`` (avg_T), ``ratio`` (avg_T as a fraction of the visual tokens),
    or an explicit schedule ``layers`` + ``keep`` (counts, or fractions of each image's tokens).

    ``method="none"`` is vanilla: no method is applied, the same code path otherwise.
    """

    method: str = "none"
    reroute: bool = False
    tier: float | None = None
    ratio: float | None = None
    layers: tuple[int, ...] | None = None
    keep: tuple[int | float, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: allowed are {', '.join(METHODS)}")
        if self.method == "none":
            if self.reroute or any(v is not None for v in (self.tier, self.ratio, self.layers, self.keep)):
                raise ValueError("method=none (vanilla) takes no reroute, tier, ratio, layers or keep")
            return
        if self.tier is not None and self.ratio is not None:
            raise ValueError(f"tier={self.tier} and ratio={self.ratio}: give one of them, not both")
        budget = self.tier is not None or self.ratio is not None
        if budget and self.keep is not None:
            raise ValueError(
                "keep= is an explicit schedule; give either keep= (with layers=) or tier=/ratio="
            )
        if not budget and self.keep is None:
            raise ValueError(
                f"method={self.method}: give a budget, tier= (avg_T, e.g. 64) or ratio= (e.g. 0.111), "
                "or an explicit schedule layers=[...],keep=[...]"
            )
        if self.keep is not None and self.layers is None:
            raise ValueError(f"keep={list(self.keep)} needs layers= (one decision layer per keep entry)")
        if self.keep is not None and len(self.keep) != len(self.layers):
            raise ValueError(f"layers={list(self.layers)} and keep={list(self.keep)} differ in length")
        if self.tier is not None and self.tier <= 0:
            raise ValueError(f"tier={self.tier}: avg_T must be > 0")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio}: must be in (0, 1]")

    @classmethod
    def from_args(
        cls,
        method: Any = "none",
        reroute: Any = False,
        tier: Any = None,
        ratio: Any = None,
        layers: Any = None,
        keep: Any = None,
    ) -> MethodSpec:
        """Build from lmms-eval-style values (strings, numbers, bools)."""
        name = str(method).strip().lower().replace("vanilla", "none") if method is not None else "none"
        return cls(
            method=name,
            reroute=parse_bool(reroute, "reroute"),
            tier=parse_number(tier, "tier"),
            ratio=parse_number(ratio, "ratio"),
            layers=parse_list(layers, "layers", integer=True),  # type: ignore[arg-type]
            keep=parse_list(keep, "keep", integer=False),
        )

    @property
    def name(self) -> str:
        """``vanilla``, ``FastV``, ``PDrop + Reroute``..."""
        return _DISPLAY[self.method] + (" + Reroute" if self.reroute else "")

    @property
    def label(self) -> str:
        if self.method == "none":
            return "vanilla"
        if self.tier is not None:
            return f"{self.name} @ avg_T {self.tier:g}"
        if self.ratio is not None:
            return f"{self.name} @ ratio {self.ratio:g}"
        return f"{self.name} layers={list(self.layers)} keep={list(self.keep)}"

    def model_args(self) -> str:
        """The ``--model_args`` fragment that reproduces this spec."""
        parts = [f"method={self.method}"]
        if self.method != "none":
            parts.append(f"reroute={str(self.reroute).lower()}")
        for key in ("tier", "ratio"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key):g}")
        for key in ("layers", "keep"):
            if getattr(self, key) is not None:
                parts.append(f"{key}=[{','.join(f'{v:g}' for v in getattr(self, key))}]")
        return ",".join(parts)
