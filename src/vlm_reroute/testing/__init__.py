"""Tiny random-weight models of the real ``transformers`` classes, their inputs and saved checkpoints.

Public so that users can test their own integrations offline, the way this project's tests do.
"""

from .checkpoints import save_tiny_checkpoint
from .models import FAMILIES, TextShape, tiny_inputs, tiny_model

__all__ = ["FAMILIES", "TextShape", "save_tiny_checkpoint", "tiny_inputs", "tiny_model"]
