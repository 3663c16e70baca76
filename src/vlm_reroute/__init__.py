"""vlm-reroute: recoverable visual-token routing (and pruning) for Hugging Face VLMs.

Names are imported lazily so that pure-arithmetic parts (``vlm_reroute.budget``, the
``vlm-reroute budget`` command) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Every method's schedule rule is registered with the torch-free budget arithmetic when the package
# is imported (methods import no torch), so ``budget`` resolves method names without importing them.
from . import methods as _methods  # noqa: E402, F401

_EXPORTS = {
    "FastV": "methods",
    "Nuwa": "methods",
    "PDrop": "methods",
    "Random": "methods",
    "TokenReduction": "methods",
    "MethodSpec": "methods",
    "ScoreFrom": "kinds",
    "method_from_spec": "methods",
    "method_names": "methods",
    "BudgetTarget": "budget.target",
    "Schedule": "budget.schedule",
    "LastTokenAttention": "scoring.attention",
    "RandomScores": "scoring.random",
    "ImageLayout": "adapters.layout",
    "Decision": "engine.trace",
    "Trace": "engine.trace",
    "kv_bytes": "engine.cache",
    "kv_lengths": "engine.cache",
    "output_cache": "engine.compat",
    "SUPPORTED_MODELS": "adapters",
    "presets": "budget.presets",
    "solver": "budget.solver",
    "pipeline": "pipelines",
    "Pipeline": "pipelines",
}
__all__ = [
    "SUPPORTED_MODELS",
    "BudgetTarget",
    "Decision",
    "FastV",
    "ImageLayout",
    "LastTokenAttention",
    "MethodSpec",
    "Nuwa",
    "PDrop",
    "Random",
    "RandomScores",
    "Schedule",
    "ScoreFrom",
    "TokenReduction",
    "method_from_spec",
    "method_names",
    "Trace",
    "kv_bytes",
    "kv_lengths",
    "output_cache",
    "presets",
    "solver",
    "pipeline",
    "Pipeline",
]

if TYPE_CHECKING:
    from .adapters import SUPPORTED_MODELS
    from .adapters.layout import ImageLayout
    from .budget import presets, solver
    from .budget.schedule import Schedule
    from .budget.target import BudgetTarget
    from .engine.cache import kv_bytes, kv_lengths
    from .engine.compat import output_cache
    from .engine.trace import Decision, Trace
    from .kinds import ScoreFrom
    from .methods import (
        FastV,
        MethodSpec,
        Nuwa,
        PDrop,
        Random,
        TokenReduction,
        method_from_spec,
        method_names,
    )
    from .pipelines import Pipeline, pipeline
    from .scoring.attention import LastTokenAttention
    from .scoring.random import RandomScores


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlm_reroute' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return module if module.__name__.endswith(f".{name}") else getattr(module, name)
