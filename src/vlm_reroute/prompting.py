"""Model inputs from a tokenizer and an image processor, for families whose processor needs torchvision.

``Qwen3VLProcessor`` (Qwen3-VL, Qwen3.5), ``LlavaOnevisionProcessor``, ``InternVLProcessor`` and
``SmolVLMProcessor`` take a video processor, and video processors need torchvision; without it
``AutoProcessor`` fails. What those processors do to a prompt is small and fixed: run the image
processor, then replace each image placeholder of the chat-formatted text by the image's tokens.
:func:`family_inputs` does that from the checkpoint's tokenizer and image processor, with the token
counts the model itself expects (read from the model's config and, for LLaVA-OneVision, from the
adapter's grid rules), so a prompt built here is the one the processor would build. Each rule is the
family adapter's ``expand_images``; the families it serves:

- Qwen3-VL / Qwen3.5: ``<|image_pad|>`` × ``t·h·w / merge²`` per image, and ``mm_token_type_ids``;
- LLaVA-OneVision: ``<image>`` × (base view + unpadded crop grid + one newline per row), or base view
  + one newline for images that share a prompt (``batch_num_images``);
- InternVL: ``<img>`` + ``<IMG_CONTEXT>`` × (tokens per tile · tiles) + ``</img>``;
- Idefics3 / SmolVLM: ``get_image_prompt_string`` (tiles row by row, then the global view).

``texts`` must hold one placeholder (the model's image token) per image, in order, as the chat
templates write them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .adapters import PROMPT_CLASSES, adapter_for

#: Model classes :func:`family_inputs` builds inputs for (each adapter declares its ``prompt_classes``).
FAMILY_PROMPTS = PROMPT_CLASSES


def family_inputs(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    images: Sequence[Sequence[Image.Image]],
    texts: Sequence[str],
) -> dict[str, Any]:
    """Inputs for prompts ``texts`` (chat-formatted, one image placeholder per image) and their images
    (``images[b]``: the images of prompt ``b``), padded as the tokenizer pads (left for generation).

    The family's rule is its adapter's (``expand_images``): this function only fills the prompts in."""
    name = type(model).__name__
    if name not in FAMILY_PROMPTS:
        raise ValueError(f"model class {name}: prompts are built here for {', '.join(FAMILY_PROMPTS)}")
    if len(images) != len(texts):
        raise ValueError(f"{len(texts)} prompts but images for {len(images)}")
    adapter = adapter_for(model, check=False)  # prompts only: routing's refusals do not apply
    image_token_id = int(model.config.image_token_id)
    placeholder = tokenizer.convert_ids_to_tokens(image_token_id)
    vision: dict[str, Any] = {}
    pieces: list[str] = []
    if any(images):
        vision, pieces = adapter.expand_images(tokenizer, image_processor, images, placeholder)
    expanded = _expand(list(texts), placeholder, pieces)
    encoded = dict(tokenizer(expanded, return_tensors="pt", padding=True))
    if adapter.token_type_ids:
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == image_token_id).to(torch.int)
    return {**encoded, **vision}


def _expand(texts: list[str], marker: str, pieces: list[str]) -> list[str]:
    """Replace the ``marker`` placeholders of ``texts``, in order, by ``pieces`` (one per image)."""
    found = sum(text.count(marker) for text in texts)
    if found != len(pieces):
        raise ValueError(
            f"{len(pieces)} images but the prompts hold {found} image placeholders {marker!r}: the chat "
            "template must write one per image"
        )
    pending = iter(pieces)
    return [
        "".join(next(pending) + part if i else part for i, part in enumerate(t.split(marker))) for t in texts
    ]
