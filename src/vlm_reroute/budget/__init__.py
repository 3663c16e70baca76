"""Torch-free budget arithmetic: model shapes, FLOPs and KV accounting, the schedule solver, tier presets.

Importing this package never imports torch or transformers, so ``vlm-reroute budget`` answers instantly.
"""

from .flops import *  # noqa: F403
from .flops import __all__  # noqa: F401
