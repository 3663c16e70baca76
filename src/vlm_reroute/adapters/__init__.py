"""Model-family adapters and the lookup that refuses unsupported models."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .idefics3 import Idefics3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter,
    Qwen2VLAdapter,
    LlavaNextAdapter,
    InternVLAdapter,
    Idefics3Adapter,
    Qwen3VLAdapter,
    Qwen3_5Adapter,
)
SUPPORTED_MODELS: tuple[str, ...] = tuple(name for a in ADAPTERS for name in a.model_classes)
#: Model classes whose prompts the adapters build without the checkpoint's processor (``expand_images``).
PROMPT_CLASSES: tuple[str, ...] = tuple(name for a in ADAPTERS for name in a.prompt_classes)


def adapter_for(model: nn.Module, check: bool = True) -> ModelAdapter:
    """The adapter for ``model``'s class, or a ``TypeError`` listing the supported classes.

    ``check=False`` skips refusing configurations routing cannot handle, for callers that only read the
    family's facts (prompt building, pictures) and do not route."""
    name = type(model).__name__
    for adapter_cls in ADAPTERS:
        if name in adapter_cls.model_classes:
            adapter = adapter_cls(model)
            if check:
                adapter.check()
            return adapter
    raise TypeError(
        f"model class {name} is not supported; supported classes are {', '.join(SUPPORTED_MODELS)} "
        "(load the checkpoint with one of them, e.g. LlavaForConditionalGeneration.from_pretrained)"
    )


__all__ = [
    "ADAPTERS",
    "Idefics3Adapter",
    "InternVLAdapter",
    "SUPPORTED_MODELS",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "ModelAdapter",
    "PROMPT_CLASSES",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "Qwen3_5Adapter",
    "adapter_for",
]
