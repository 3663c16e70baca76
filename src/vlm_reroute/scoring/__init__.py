"""Scorers: how a decision ranks the candidate visual tokens (see :mod:`.base` for the protocol).

Imported lazily: ``LastTokenAttention`` and ``RandomScores`` import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LastTokenAttention": "attention",
    "RandomScores": "random",
    "Scorer": "base",
    "ScoringContext": "base",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlm_reroute.scoring' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
