"""vlm-reroute: recoverable visual-token routing (and pruning) for Hugging Face VLMs.

Names are imported lazily so that pure-arithmetic parts (``vlm_reroute.budget``, the
``vlm-reroute budget`` command) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FastV": "methods",
    "PDrop": "methods",
    "TokenReduction": "methods",
    "Decision": "trace",
    "Trace": "trace",
    "kv_bytes": "cache",
    "kv_lengths": "cache",
    "SUPPORTED_MODELS": "adapters",
    "presets": None,
}
__all__ = [
    "SUPPORTED_MODELS",
    "Decision",
    "FastV",
    "PDrop",
    "TokenReduction",
    "Trace",
    "kv_bytes",
    "kv_lengths",
    "presets",
]

if TYPE_CHECKING:
    from . import presets
    from .adapters import SUPPORTED_MODELS
    from .cache import kv_bytes, kv_lengths
    from .methods import FastV, PDrop, TokenReduction
    from .trace import Decision, Trace


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlm_reroute' has no attribute {name!r}")
    module = _EXPORTS[name]
    if module is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{module}", __name__), name)
