"""What the executor needs to know about a model family, and nothing more.

An adapter finds the decoder and its layers, marks the visual tokens of a prompt and tells
which image each belongs to, and applies the family's rotary embedding for scoring. Everything
else (gather, scatter, masks, cache) is shared and lives in the executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelAdapter(ABC):
    """Base adapter for ``*ForConditionalGeneration`` models with a Llama-style decoder."""

    #: Class names of the models this adapter accepts.
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def decoder(self) -> nn.Module:
        """The text decoder (holds ``layers``, ``rotary_emb`` and ``config``)."""
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def text_config(self) -> Any:
        return self.decoder.config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``(B, N)``: positions that hold image features."""
        return input_ids == self.image_token_id

    @abstractmethod
    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Long ``(B, N)``: global image index (counted over the batch in sample order) per visual
        token, ``-1`` elsewhere. Each image is routed with its own keep count."""

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``(B, T, heads, head_dim)`` in place with ``cos``/``sin`` ``(B, T, head_dim)``.

        ``x`` is a fresh projection the scorer owns, so it is overwritten rather than copied. Both
        supported families fold MRoPE's three axes into ``cos``/``sin`` inside their rotary module,
        so one formula serves 1-D RoPE and MRoPE alike.
        """
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        rotated = rotate_half(x)
        return x.mul_(cos).addcmul_(rotated, sin)

    def check(self) -> None:
        """Refuse configurations the executor cannot route exactly."""
        cfg = self.text_config
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"{type(self.model).__name__} has layer types {sorted(set(layer_types))}; "
                "vlm-reroute routes only decoders whose layers are all 'full_attention'"
            )
