"""Token-reduction methods: one small frozen dataclass per method, applied as a reversible context manager.

A new method is one file here: a dataclass subclassing :class:`TokenReduction`, decorated with
:func:`register`, that owns its scorer and its schedule rules (see ``docs/extending.md``).
"""

from .base import TokenReduction
from .fastv import FastV
from .pdrop import PDrop
from .random import Random
from .registry import METHODS, method_class, method_from_spec, method_names, register
from .sparsevlm import SparseVLM
from .spec import MethodSpec

# isort: split
from .dart import DART  # registered after the attention methods (budget tables list it after them)

# isort: split
from .nuwa import Nuwa  # registered last: budget tables list it after FastV and PDrop

# isort: split
from .divprune import DivPrune  # stage-1 methods (composed with any in-decoder method: stage1.py)
from .visionzip import VisionZip

__all__ = [
    "DART",
    "METHODS",
    "FastV",
    "MethodSpec",
    "Nuwa",
    "PDrop",
    "Random",
    "DivPrune",
    "VisionZip",
    "SparseVLM",
    "TokenReduction",
    "method_class",
    "method_from_spec",
    "method_names",
    "register",
]
