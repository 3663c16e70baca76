"""The examples the README points to run as written (CI ran ``examples/tiny_demo.py`` as part of the
README's first command until ``vlm-reroute demo`` took that place)."""

from __future__ import annotations

import runpy
from pathlib import Path

from vlm_reroute.testing.models import FAMILIES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_tiny_demo_routes_every_family_in_both_modes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # one table line per row
    runpy.run_path(str(EXAMPLES / "tiny_demo.py"), run_name="__main__")
    rows = [line.strip("│ ") for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    names = [row.split("│")[0].strip() for row in rows]
    expected = ["vanilla", "FastV", "FastV + Reroute", "PDrop", "PDrop + Reroute"]
    assert names == expected * len(FAMILIES)
    kv_share = [row.split("│")[4].strip() for row in rows]
    assert all(share != "100%" for share, name in zip(kv_share, names, strict=True) if name != "vanilla")
