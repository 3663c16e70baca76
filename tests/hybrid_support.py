"""Shared fixtures for tests of default layers on a hybrid decoder (Qwen3.5): the released 9B
layout as ``bind`` reads it, and the tiny Qwen3.5 model with one image."""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

from vlm_reroute.testing.families import tiny_family_inputs, tiny_family_model
from vlm_reroute.testing.family_inputs import DEFAULT_IMAGES

QWEN3_5_9B = tuple(range(3, 32, 4))  # full attention at 3, 7, ..., 31 of 32 layers


def released_layout() -> SimpleNamespace:
    """What ``bind`` reads of an adapter, for Qwen3.5-9B's layout (no 32-layer model is built)."""
    previous = tuple(i + 1 for i in QWEN3_5_9B if i + 1 < 32)

    def allowed(given=None):
        return previous if str(getattr(given, "value", given)) == "previous" else QWEN3_5_9B

    return SimpleNamespace(layers=[None] * 32, allowed_decision_layers=allowed)


@cache
def tiny_qwen3_5():
    """The tiny Qwen3.5 model and inputs with one image (built once per test process)."""
    model = tiny_family_model("qwen3_5")
    inputs = tiny_family_inputs("qwen3_5", sizes=(DEFAULT_IMAGES["qwen"][1],), questions=("Compare them.",))
    return model, inputs
