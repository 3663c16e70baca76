"""The values of a :class:`~vlm_reroute.methods.spec.MethodSpec` as each edge spells them, parsed.

Two spellings need more than Python's own types: lmms-eval's ``--model_args`` pass every value as a
string unless it looks like a bool or a number (``layers=[2,7,15,23]`` arrives as the string
``"[2,7,15,23]"``, so lists are accepted as JSON or ``;``-separated), and the command line's options
(``--layers 2,7``, ``--keep 0.5,0.25``, one of ``--tier``/``--ratio``/``--flops-fraction``). Each
parser raises one ``ValueError`` line naming the value as the person typed it and what is allowed.
Torch-free.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

#: the key of vanilla (no method) in a spec and in ``--model_args``
VANILLA = "none"
#: the command line's budget when none is given: 11.1 % of the visual tokens on average (64 of 576)
DEFAULT_RATIO = 0.111
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# ---- lmms-eval's --model_args -----------------------------------------------------------------
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


def refuse_unknown_args(given: Iterable[str], extra: Sequence[str], init: Callable[..., Any]) -> None:
    """``--model_args`` names that ``init`` (the plugin's ``__init__``) does not take, as one error
    listing the ones it does; ``extra`` names are passed by lmms-eval itself and accepted."""
    unknown = sorted(k for k in given if k not in extra)
    if unknown:
        allowed = [p for p in inspect.signature(init).parameters][1:-1]
        raise ValueError(f"vlm_reroute: unknown model_args {unknown}; allowed are {', '.join(allowed)}")


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def parse_number(value: Any, what: str) -> float | None:
    if _absent(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}={value!r}: give a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r}: give a number") from None


def parse_layer(value: Any, what: str) -> int | None:
    """A decoder layer index (``withdraw_at=20``, ``"20"``); the range is the method's check."""
    if _absent(value):
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("-").isdigit():
        raise ValueError(f"{what}={value!r}: give a decoder layer index (an integer, e.g. 20)")
    return int(text)


def parse_list(value: Any, what: str, integer: bool) -> tuple[int | float, ...] | None:
    """A list from a Python sequence, a JSON list string, a ``;``-separated string or a single number.

    Integers stay counts and decimals stay fractions (``[64, 32]`` → ints, ``[1.0, 0.5]`` → floats);
    ``integer`` refuses decimals (decision layers).
    """
    if _absent(value):
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


# ---- the command line's options --------------------------------------------------------------
def option_layers(text: str | None) -> list[int] | None:
    """``--layers 2,7,15,23``."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(
            f"--layers {text!r}: give comma-separated decoder layer indices, e.g. 2,7,15,23"
        ) from None


def option_keep(text: str | None) -> list[int | float] | None:
    """``--keep``: counts (``46,46,23,12``) or fractions of each image's tokens (``0.5,0.25``)."""
    if text is None:
        return None
    out: list[int | float] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            out.append(int(item))
        except ValueError:
            try:
                out.append(float(item))
            except ValueError:
                raise ValueError(
                    f"--keep {text!r}: give comma-separated token counts (e.g. 46,46,23,12) or fractions "
                    "of each image's tokens in (0, 1] (e.g. 0.5,0.25)"
                ) from None
    return out


def option_withdraw(layer: int | None) -> int | None:
    """``--withdraw-at K`` (VTW): a layer index ≥ 1; the method checks it against its schedule and depth."""
    if layer is not None and layer < 1:
        raise ValueError(
            f"--withdraw-at {layer}: give a decoder layer index ≥ 1, after the last decision layer "
            "and before the last layer"
        )
    return layer


def option_settings(values: Sequence[str] | None) -> dict[str, Any]:
    """``--set k=0.25 --set variant=v2.0``: the method's own settings as keywords. A value reads as an
    int, a float, ``true``/``false`` or else a string; the method checks names and values."""
    out: dict[str, Any] = {}
    for text in values or ():
        name, sep, raw = text.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name.isidentifier() or not raw:
            raise ValueError(f"--set {text!r}: give NAME=VALUE, e.g. --set k=0.25")
        if name in out:
            raise ValueError(f"--set {name}: given twice ({out[name]!r} and {raw!r})")
        out[name] = _setting_value(raw)
    return out


def _setting_value(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    lowered = raw.lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else raw


def option_budget(
    tier: float | None, ratio: float | None, flops_fraction: float | None, strict: bool, explicit_keep: bool
) -> dict[str, float]:
    """The budget of ``--tier``/``--ratio``/``--flops-fraction`` as keywords (``{"tier": 64}``; ``{}``
    with explicit ``--keep``; ``{"ratio": DEFAULT_RATIO}`` when none is given), checked with the
    options' names."""
    given = {
        name: value
        for name, value in (("tier", tier), ("ratio", ratio), ("flops-fraction", flops_fraction))
        if value is not None
    }
    if len(given) > 1:
        raise ValueError(
            f"{', '.join(f'--{k} {v:g}' for k, v in given.items())}: give one budget, not several"
        )
    if explicit_keep:
        if given:
            ((name, value),) = given.items()
            raise ValueError(
                f"--{name} {value:g} with --keep: give a budget to solve keep counts for, or --keep, not both"
            )
        if strict:
            raise ValueError(
                "--strict applies to a budget (--tier, --ratio, --flops-fraction), not to explicit --keep"
            )
        return {}
    if not given:
        given = {"ratio": DEFAULT_RATIO}
    ((name, value),) = given.items()
    if name == "tier" and not value > 0:
        raise ValueError(f"--tier {value:g}: visual tokens per layer must be > 0")
    if name != "tier" and not 0 < value <= 1:
        raise ValueError(f"--{name} {value:g}: a fraction must be in (0, 1]")
    return {name.replace("-", "_"): value}
