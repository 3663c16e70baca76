"""The demo: procedurally drawn grounding / VQA scenes and a small LLaVA trained on them, shipped
with the package so that routing can be shown (and checked) on a model that actually grounds.

- :func:`scenes` — the deterministic scene generator (public API, see :mod:`.scenes`);
- :func:`checkpoint_path` — the shipped model folder (``AutoModelForImageTextToText`` /
  ``AutoProcessor`` / :func:`vlm_reroute.pipeline` load it offline);
- ``python -m vlm_reroute.demo.train`` / ``.export`` — training it and shipping a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from .scenes import FAMILIES, GROUND_FAMILIES, KINDS, VQA_FAMILIES, scenes

__all__ = ["FAMILIES", "GROUND_FAMILIES", "KINDS", "VQA_FAMILIES", "checkpoint_path", "scenes"]


def checkpoint_path() -> Path:
    """The folder of the shipped demo model (package data: fp16 weights, processor, chat template).

    The folder is returned whether or not weights are in it yet; :func:`has_checkpoint` says which.
    """
    return Path(__file__).resolve().parent / "checkpoint"


def has_checkpoint() -> bool:
    """Whether the shipped folder holds weights (a development tree may not, before the first export)."""
    return (checkpoint_path() / "model.safetensors").exists()
