"""Batched, left-padded model inputs from chat conversations, with each checkpoint's own chat template.

A conversation is a list of ``{"role", "content"}`` messages whose content items are
``{"type": "text", "text": ...}`` or ``{"type": "image", "image": PIL.Image}`` (lmms-eval's
``ChatMessages.to_hf_messages()`` format). The checkpoint's processor builds the inputs when it can be
loaded. ``Qwen2VLProcessor`` cannot be built without torchvision (it owns a video processor); then the
inputs are assembled from the tokenizer and the image processor exactly as the processor would: chat
template, one ``<|image_pad|>`` per merged patch for each image in order, ``mm_token_type_ids``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

Conversation = list[dict[str, Any]]


_IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")


def simple_conversation(context: str, visuals: list[Any]) -> Conversation:
    """A one-turn conversation from a simple-interface request: the images first, then the text
    (lmms-eval's ``<image>`` placeholders removed: the chat template places the images)."""
    images = [v for v in visuals if isinstance(v, Image.Image)]
    if len(images) != len(visuals):
        raise ValueError("vlm_reroute answers image (and text-only) requests; got a non-image visual")
    content: list[dict[str, Any]] = [{"type": "image", "image": img} for img in images]
    content.append({"type": "text", "text": _IMAGE_PLACEHOLDER.sub("", context)})
    return [{"role": "user", "content": content}]


def conversation_images(conversation: Conversation) -> list[Image.Image]:
    """The images of a conversation, in order, as RGB."""
    return [
        item["image"].convert("RGB")
        for message in conversation
        for item in message["content"]
        if item.get("type") == "image"
    ]


def _template_view(conversation: Conversation) -> Conversation:
    """The conversation without image payloads (chat templates need only the ``type``)."""
    kinds = {c.get("type") for m in conversation for c in m["content"]} - {"text", "image"}
    if kinds:
        raise ValueError(f"vlm_reroute answers text and image prompts; this one holds {sorted(kinds)}")
    return [
        {
            "role": m["role"],
            "content": [{"type": "image"} if c.get("type") == "image" else c for c in m["content"]],
        }
        for m in conversation
    ]


@dataclass
class InputBuilder:
    """Turns conversations into one left-padded batch for ``model``."""

    tokenizer: Any
    processor: Any = None
    image_processor: Any = None
    image_token_id: int | None = None

    @classmethod
    def from_pretrained(
        cls, name: str, model: Any, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> InputBuilder:
        import transformers

        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        is_qwen = "Qwen" in type(model).__name__
        if pixels and not is_qwen:
            raise ValueError(
                f"min_pixels/max_pixels apply to Qwen2-VL / Qwen2.5-VL only, not {type(model).__name__}"
            )
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(model.config, "image_token_index", None)
        try:
            processor = transformers.AutoProcessor.from_pretrained(name, **pixels)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                processor.tokenizer.padding_side = "left"
                return cls(tokenizer=processor.tokenizer, processor=processor, image_token_id=image_token_id)
        except (OSError, ValueError, ImportError, AttributeError, TypeError):
            if not is_qwen:
                raise
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        tokenizer.padding_side = "left"
        image_processor = transformers.AutoImageProcessor.from_pretrained(name, **pixels)
        return cls(tokenizer=tokenizer, image_processor=image_processor, image_token_id=image_token_id)

    def texts(self, conversations: list[Conversation]) -> list[str]:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise ValueError("the checkpoint has no chat template (tokenizer or processor)")
        return [
            owner.apply_chat_template(_template_view(c), add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]

    def __call__(self, conversations: list[Conversation]) -> dict[str, torch.Tensor]:
        texts = self.texts(conversations)
        images = [img for c in conversations for img in conversation_images(c)]
        if self.processor is not None:
            kwargs = {"images": images} if images else {}
            return dict(self.processor(text=texts, padding=True, return_tensors="pt", **kwargs))
        return self._qwen_inputs(texts, [conversation_images(c) for c in conversations])

    def _qwen_inputs(self, texts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        flat = [img for per_sample in images for img in per_sample]
        vision: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if flat:
            vision = dict(self.image_processor(images=flat, return_tensors="pt"))
            merge = self.image_processor.merge_size
            counts = [int(g.prod()) // (merge * merge) for g in vision["image_grid_thw"]]
        expanded, cursor = [], 0
        for text, per_sample in zip(texts, images, strict=True):
            pieces = text.split(pad)
            if len(pieces) - 1 != len(per_sample):
                raise ValueError(
                    f"the chat template placed {len(pieces) - 1} image tokens {pad!r} for "
                    f"{len(per_sample)} images"
                )
            out = pieces[0]
            for piece in pieces[1:]:
                out += pad * counts[cursor] + piece
                cursor += 1
            expanded.append(out)
        encoded = dict(self.tokenizer(expanded, padding=True, return_tensors="pt"))
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).to(torch.int)
        return {**encoded, **vision}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
