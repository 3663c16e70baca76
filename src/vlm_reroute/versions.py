"""The releases of the libraries vlm-reroute was tested with (a leaf: imports nothing heavy).

``pyproject.toml`` declares the same ranges; ``vlm-reroute --version`` prints what is installed
beside them, and applying a method refuses a ``transformers`` outside its range
(``engine/compat.py``), because routing hooks that library's internals.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

#: ``transformers``: lowest tested release, first untested one.
TRANSFORMERS_RANGE = ("5.23.0", "5.26.0")
#: Set to ``1`` to route under an untested ``transformers`` (the refusal becomes one warning).
OPT_IN = "VLM_REROUTE_ALLOW_UNTESTED_TRANSFORMERS"
#: Every library whose release matters to a result, with the range tested (``None``: not bounded).
TESTED = {
    "transformers": TRANSFORMERS_RANGE,
    "torch": ("2.13.0", "2.14.0"),
    "lmms-eval": ("0.7.3", "0.8.0"),
}


def range_text(bounds: tuple[str, str]) -> str:
    low, high = bounds
    return f">={low},<{high}"


def in_range(installed: str, bounds: tuple[str, str]) -> bool:
    """Whether ``installed`` (a PEP 440 version, local labels such as ``+cpu`` included) lies in
    ``[low, high)``."""
    low, high = bounds
    return Version(low) <= Version(installed) < Version(high)


def installed_versions() -> dict[str, str | None]:
    """The installed release of each library of :data:`TESTED` (``None`` when not installed)."""
    found: dict[str, str | None] = {}
    for name in TESTED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def report_lines() -> list[str]:
    """One line per library: installed release, tested range, inside or not."""
    lines = []
    for name, installed in installed_versions().items():
        bounds = TESTED[name]
        if installed is None:
            verdict = "not installed"
        elif in_range(installed, bounds):
            verdict = "tested"
        else:
            verdict = "UNTESTED"
        lines.append(f"{name} {installed or '-'} (tested {range_text(bounds)}): {verdict}")
    return lines
