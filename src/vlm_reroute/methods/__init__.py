"""Token-reduction methods: one small frozen dataclass per method, applied as a reversible context manager.

A new method is one file here: a dataclass subclassing :class:`TokenReduction`, decorated with
:func:`register`, that owns its scorer and its schedule rules (see ``docs/extending.md``).
"""

from .base import TokenReduction
from .fastv import FastV
from .pdrop import PDrop
from .random import Random
from .registry import METHODS, method_class, method_from_spec, method_names, register
from .spec import MethodSpec

# isort: split
from .nuwa import Nuwa  # registered last: budget tables list it after FastV and PDrop

__all__ = [
    "METHODS",
    "FastV",
    "MethodSpec",
    "Nuwa",
    "PDrop",
    "Random",
    "TokenReduction",
    "method_class",
    "method_from_spec",
    "method_names",
    "register",
]
