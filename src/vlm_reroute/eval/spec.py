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

VANILLA = "none"
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
    """A method name and its budget: ``tier`` (avg_T), ``ratio`` (avg_T as a fraction of each image's
    visual tokens), ``flops_fraction``, or an explicit schedule ``layers`` + ``keep`` (counts, or
    fractions of each image's tokens). A budget is solved per prompt for its image sizes.

    ``method="none"`` is vanilla: no method is applied, the same code path otherwise. Other names are
    those of :func:`vlm_reroute.methods.method_names` (checked by building the method, torch-free);
    with neither a budget nor a schedule the method's own defaults apply.
    """

    method: str = VANILLA
    reroute: bool = False
    tier: float | None = None
    ratio: float | None = None
    flops_fraction: float | None = None
    layers: tuple[int, ...] | None = None
    keep: tuple[int | float, ...] | None = None

    def __post_init__(self) -> None:
        if self.method == VANILLA:
            extra = [
                k
                for k in ("tier", "ratio", "flops_fraction", "layers", "keep")
                if getattr(self, k) is not None
            ]
            if self.reroute or extra:
                raise ValueError(
                    f"method=none (vanilla) takes no {', '.join(extra) or 'reroute'}; name a method "
                    f"({', '.join(_method_names())}) to reduce tokens"
                )
            return
        if self.method not in _method_names():
            raise ValueError(f"method={self.method!r}: allowed are none, {', '.join(_method_names())}")
        self.build()  # the factory's own checks (one budget, keep with layers, ranges)

    @classmethod
    def from_args(
        cls,
        method: Any = VANILLA,
        reroute: Any = False,
        tier: Any = None,
        ratio: Any = None,
        flops_fraction: Any = None,
        layers: Any = None,
        keep: Any = None,
    ) -> MethodSpec:
        """Build from lmms-eval-style values (strings, numbers, bools)."""
        name = VANILLA if method is None else str(method).strip().lower()
        return cls(
            method=VANILLA if name == "vanilla" else name,
            reroute=parse_bool(reroute, "reroute"),
            tier=parse_number(tier, "tier"),
            ratio=parse_number(ratio, "ratio"),
            flops_fraction=parse_number(flops_fraction, "flops_fraction"),
            layers=parse_list(layers, "layers", integer=True),  # type: ignore[arg-type]
            keep=parse_list(keep, "keep", integer=False),
        )

    def build(self) -> Any:
        """The method (``vlm_reroute.methods.method_from_spec``), or ``None`` for vanilla."""
        if self.method == VANILLA:
            return None
        from ..methods.registry import method_from_spec

        return method_from_spec(
            self.method,
            reroute=self.reroute,
            tier=self.tier,
            ratio=self.ratio,
            flops_fraction=self.flops_fraction,
            layers=self.layers,
            keep=self.keep,
        )

    @property
    def name(self) -> str:
        """``vanilla``, ``FastV``, ``PDrop + Reroute``..."""
        if self.method == VANILLA:
            return "vanilla"
        from ..methods.registry import method_class

        cls, reroute = method_class(self.method, self.reroute)
        return cls.label(reroute)

    @property
    def label(self) -> str:
        if self.method == VANILLA:
            return "vanilla"
        for key, text in (("tier", "avg_T"), ("ratio", "ratio"), ("flops_fraction", "FLOPs fraction")):
            if getattr(self, key) is not None:
                return f"{self.name} @ {text} {getattr(self, key):g}"
        if self.keep is not None:
            return f"{self.name} layers={list(self.layers)} keep={list(self.keep)}"
        return f"{self.name} (defaults)"

    def model_args(self) -> str:
        """The ``--model_args`` fragment that reproduces this spec."""
        parts = [f"method={self.method}"]
        if self.method != VANILLA:
            parts.append(f"reroute={str(self.reroute).lower()}")
        for key in ("tier", "ratio", "flops_fraction"):
            if getattr(self, key) is not None:
                parts.append(f"{key}={getattr(self, key):g}")
        for key in ("layers", "keep"):
            if getattr(self, key) is not None:
                values = (f"{v:g}" if isinstance(v, float) else str(v) for v in getattr(self, key))
                parts.append(f"{key}=[{','.join(values)}]")
        return ",".join(parts)


def _method_names() -> tuple[str, ...]:
    from ..methods.registry import method_names

    return method_names()
