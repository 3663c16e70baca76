"""LLaVA-1.5 (``LlavaForConditionalGeneration``): Llama decoder, 1-D RoPE, fixed tokens per image."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    model_classes = ("LlavaForConditionalGeneration",)

    def tokens_per_image(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> int:
        """LLaVA-1.5 images all expand to the same number of placeholders: split the runs by it.

        Adjacent images form one run, so the count comes from the number of images passed
        (``pixel_values``) when there is one, else from the config.
        """
        total = int(self.visual_mask(input_ids).sum())
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is not None and pixel_values.ndim == 4 and pixel_values.shape[0] > 0:
            n_images = pixel_values.shape[0]
            if total % n_images:
                raise ValueError(
                    f"{total} image tokens for {n_images} images: LLaVA routing needs the same number "
                    "of placeholder tokens per image"
                )
            return total // n_images
        return int(self.model.config.image_seq_length)

    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        visual = self.visual_mask(input_ids)
        per_image = self.tokens_per_image(input_ids, model_kwargs)
        counts = visual.sum(dim=1)
        if bool((counts % per_image != 0).any()):
            raise ValueError(
                f"image token counts per sample {counts.tolist()} are not multiples of {per_image} "
                "tokens per image"
            )
        rank = visual.cumsum(dim=1) - 1
        offset = (counts // per_image).cumsum(0) - counts // per_image
        ids = rank // per_image + offset[:, None]
        return torch.where(visual, ids, torch.full_like(ids, -1))
