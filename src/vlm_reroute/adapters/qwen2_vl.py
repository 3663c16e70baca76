"""Qwen2-VL and Qwen2.5-VL: Qwen2 decoder with GQA and 3-axis MRoPE, dynamic tokens per image.

Each image is one run of ``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``,
so runs are images. Video tokens are not routed (they go through every layer like text).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        visual = self.visual_mask(input_ids)
        previous = torch.nn.functional.pad(visual[:, :-1], (1, 0), value=False)
        starts = visual & ~previous
        ids = starts.flatten().cumsum(0).view_as(visual) - 1
        grid = model_kwargs.get("image_grid_thw")
        if grid is not None and int(starts.sum()) != grid.shape[0]:
            raise ValueError(
                f"{int(starts.sum())} runs of image tokens but image_grid_thw describes {grid.shape[0]} "
                "images: each image must be one run of <|image_pad|> tokens"
            )
        return torch.where(visual, ids, torch.full_like(ids, -1))
