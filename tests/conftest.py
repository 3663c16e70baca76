"""Shared fixtures: tiny random-weight models of every supported family, built once per session."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from vlm_reroute.testing.models import FAMILIES, TextShape, tiny_model

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@cache
def model_for(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """Cached tiny model (8 layers, hidden 64, 576 visual tokens per image in fp32)."""
    if dtype == torch.float32:
        return tiny_model(family, attn_implementation=attn)
    # bf16/fp16: the tiniest shapes only (this CPU has no fast half precision)
    kwargs = {"shape": TextShape(layers=4, hidden=32, heads=2, ffn=64)}
    if family == "llava":
        kwargs["image_size"] = 112
    return tiny_model(family, attn_implementation=attn, dtype=dtype, **kwargs)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
