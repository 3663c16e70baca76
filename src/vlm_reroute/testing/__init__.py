"""Tiny random-weight models of the real ``transformers`` classes, their inputs and saved checkpoints.

Public so that users can test their own integrations offline, the way this project's tests do.
:func:`save_tiny_checkpoint` saves any family of :data:`FAMILIES` (the names of
:data:`vlm_reroute.families.FAMILIES`); :func:`tiny_model` / :func:`tiny_inputs` build the first kit's
three (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) in memory, :mod:`.families` the others.
"""

from ..families import family_names
from .checkpoints import save_tiny_checkpoint
from .models import TextShape, tiny_inputs, tiny_model

FAMILIES = family_names()

__all__ = ["FAMILIES", "TextShape", "save_tiny_checkpoint", "tiny_inputs", "tiny_model"]
