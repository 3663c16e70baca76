"""Batched, left-padded model inputs from chat conversations, with each checkpoint's own chat template.

A conversation is a list of ``{"role", "content"}`` messages whose content items are
``{"type": "text", "text": ...}`` or ``{"type": "image", "image": PIL.Image}`` (lmms-eval's
``ChatMessages.to_hf_messages()`` format). The checkpoint's processor builds the inputs when it can be
loaded. The Qwen, LLaVA-OneVision, InternVL and SmolVLM processors cannot be built without torchvision
(they own a video processor); then the inputs are assembled from the tokenizer and the image processor
exactly as the processor would (:func:`vlm_reroute.prompting.family_inputs`, the one expansion rule the
pipeline and the CLI use too): chat template, each image placeholder expanded to the image's tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..families import FAMILIES, family_of_class
from ..prompting import FAMILY_PROMPTS, family_inputs

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
    """Turns conversations into one left-padded batch for ``model``.

    It exists because lmms-eval hands the plugin chat messages, and several families' processors
    cannot be built without torchvision: then the batch is assembled from the tokenizer and the image
    processor by the same rule the pipeline uses (module docstring).
    """

    tokenizer: Any
    processor: Any = None
    image_processor: Any = None
    image_token_id: int | None = None
    model: Any = field(default=None, repr=False)

    @classmethod
    def from_pretrained(
        cls, name: str, model: Any, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> InputBuilder:
        """The checkpoint's processor, or (its processor needs torchvision) its tokenizer and image processor.

        ``min_pixels`` / ``max_pixels`` bound the Qwen families' dynamic resolution; other families tile or
        resize to fixed sizes, and passing them is an error naming the families they apply to.
        """
        import transformers

        # keyword arguments (Any: from transformers 5.25 from_pretrained annotates its named keywords)
        pixels: dict[str, Any] = {
            k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None
        }
        class_name = type(model).__name__
        if pixels and not family_of_class(class_name).qwen_pixels:
            bounded = ", ".join(f.label for f in FAMILIES if f.qwen_pixels)
            raise ValueError(
                f"min_pixels/max_pixels apply to the Qwen families ({bounded}), not {class_name}"
            )
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(model.config, "image_token_index", None)
        try:
            processor = transformers.AutoProcessor.from_pretrained(name, **pixels)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                processor.tokenizer.padding_side = "left"
                return cls(processor.tokenizer, processor, image_token_id=image_token_id, model=model)
        except (OSError, ValueError, ImportError, AttributeError, TypeError, KeyError):
            if class_name not in FAMILY_PROMPTS:
                raise
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        tokenizer.padding_side = "left"
        image_processor = transformers.AutoImageProcessor.from_pretrained(name, **pixels)
        return cls(tokenizer, image_processor=image_processor, image_token_id=image_token_id, model=model)

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
        per_sample = [conversation_images(c) for c in conversations]
        if self.processor is not None:
            images = [img for row in per_sample for img in row]
            kwargs = {"images": images} if images else {}
            return dict(self.processor(text=texts, padding=True, return_tensors="pt", **kwargs))
        return family_inputs(self.model, self.tokenizer, self.image_processor, per_sample, texts)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
