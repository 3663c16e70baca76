"""Model inputs from a tokenizer and an image processor, for families whose processor needs torchvision.

``Qwen3VLProcessor`` (Qwen3-VL, Qwen3.5), ``LlavaOnevisionProcessor``, ``InternVLProcessor`` and
``SmolVLMProcessor`` take a video processor, and video processors need torchvision; without it
``AutoProcessor`` fails. What those processors do to a prompt is small and fixed: run the image
processor, then replace each image placeholder of the chat-formatted text by the image's tokens.
:func:`family_inputs` does that from the checkpoint's tokenizer and image processor, with the token
counts the model itself expects (read from the model's config and, for LLaVA-OneVision, from the
adapter's grid rules), so a prompt built here is the one the processor would build:

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

#: Model classes :func:`family_inputs` builds inputs for.
FAMILY_PROMPTS = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "InternVLForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "SmolVLMForConditionalGeneration",
)


def family_inputs(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    images: Sequence[Sequence[Image.Image]],
    texts: Sequence[str],
) -> dict[str, Any]:
    """Inputs for prompts ``texts`` (chat-formatted, one image placeholder per image) and their images
    (``images[b]``: the images of prompt ``b``), padded as the tokenizer pads (left for generation)."""
    name = type(model).__name__
    if name not in FAMILY_PROMPTS:
        raise ValueError(f"model class {name}: prompts are built here for {', '.join(FAMILY_PROMPTS)}")
    if len(images) != len(texts):
        raise ValueError(f"{len(texts)} prompts but images for {len(images)}")
    placeholder = tokenizer.convert_ids_to_tokens(int(model.config.image_token_id))
    flat = [image for row in images for image in row]
    vision: dict[str, Any] = {}
    pieces: list[str] = []
    if flat and name.startswith("Qwen"):
        vision = dict(image_processor(images=flat, return_tensors="pt"))
        merge = image_processor.merge_size
        pieces = [placeholder * (int(g.prod()) // merge**2) for g in vision["image_grid_thw"]]
    elif flat and name == "LlavaOnevisionForConditionalGeneration":
        from .adapters.llava_next import LlavaNextAdapter

        vision = dict(image_processor(images=[list(row) for row in images], return_tensors="pt"))
        shapes = LlavaNextAdapter(model).image_shapes(vision)
        pieces = [placeholder * shape.length for shape in shapes]
    elif flat and name == "InternVLForConditionalGeneration":
        from .adapters.internvl import InternVLAdapter

        vision = dict(image_processor(images=flat, return_tensors="pt"))
        rows, cols = InternVLAdapter(model).tile_grid
        start = getattr(tokenizer, "start_image_token", "<img>")
        end = getattr(tokenizer, "end_image_token", "</img>")
        pieces = [start + placeholder * rows * cols * int(n) + end for n in vision.pop("num_patches")]
    elif flat:  # Idefics3 / SmolVLM
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        vision = dict(
            image_processor(
                images=[list(row) for row in images], return_tensors="pt", return_row_col_info=True
            )
        )
        fake = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        global_token = getattr(tokenizer, "global_image_token", "<global-img>")
        per_tile = int(model.model.image_seq_len)
        grids = zip(
            [r for row in vision.pop("rows") for r in row],
            [c for col in vision.pop("cols") for c in col],
            strict=True,
        )
        pieces = [get_image_prompt_string(r, c, per_tile, fake, placeholder, global_token) for r, c in grids]
    expanded = _expand(list(texts), placeholder, pieces)
    encoded = dict(tokenizer(expanded, return_tensors="pt", padding=True))
    if name.startswith("Qwen"):
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == int(model.config.image_token_id)).to(
            torch.int
        )
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
