"""LLaVA-1.5 (``LlavaForConditionalGeneration``): Llama decoder, 1-D RoPE, one square grid per image.

Each image is ``(image_size / patch_size)²`` placeholder tokens (24 × 24 = 576 for CLIP ViT-L/14 at
336 px) in raster order. Inputs that are not one 4-D image batch (e.g. LLaVA-NeXT-style crops)
are refused instead of being split into wrong "images".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import ModelAdapter

if TYPE_CHECKING:
    from .vision import ClipTap


class LlavaAdapter(ModelAdapter):
    model_classes = ("LlavaForConditionalGeneration",)
    image_placements = {"CLIPImageProcessor": "resize_crop", "LlavaImageProcessor": "pad_resize_crop"}

    @property
    def grid_side(self) -> int:
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def tokens_per_image(self, model_kwargs: dict[str, Any]) -> int:
        """Placeholders per image: the square patch grid (the CLS token is dropped by the default
        ``vision_feature_select_strategy``)."""
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: LLaVA-1.5 routing needs one "
                "(images, channels, height, width) batch; multi-crop inputs belong to LLaVA-NeXT"
            )
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: routing knows the 'default' layout "
                "(patch tokens only, in a square grid)"
            )
        return self.grid_side**2

    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        visual = self.visual_mask(input_ids)
        per_image = self.tokens_per_image(model_kwargs)
        counts = visual.sum(dim=1)
        if bool((counts % per_image != 0).any()):
            raise ValueError(
                f"image token counts per sample {counts.tolist()} are not multiples of {per_image} "
                f"tokens per image ({self.grid_side}×{self.grid_side} patches)"
            )
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is not None and int(counts.sum()) != pixel_values.shape[0] * per_image:
            raise ValueError(
                f"{int(counts.sum())} image tokens for {pixel_values.shape[0]} images: each image needs "
                f"{per_image} placeholder tokens"
            )
        rank = visual.cumsum(dim=1) - 1
        offset = (counts // per_image).cumsum(0) - counts // per_image
        ids = rank // per_image + offset[:, None]
        return torch.where(visual, ids, torch.full_like(ids, -1))

    def image_grids(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        n_images = int(image_ids.max()) + 1
        return [(self.grid_side, self.grid_side)] * n_images

    def fixed_grid(self) -> tuple[int, int]:
        """Every image is the tower's ``side × side`` patch grid, whatever its size."""
        return self.grid_side, self.grid_side

    def vision_tap(self) -> ClipTap:
        """The [CLS] row and keys of the feature-layer block; rows from the projector (``vision.py``)."""
        from .vision import ClipTap

        cfg = self.config
        if cfg.vision_feature_select_strategy != "default" or not isinstance(cfg.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}, "
                f"vision_feature_layer={cfg.vision_feature_layer!r}: a stage-1 salience needs the [CLS] "
                "token and one feature layer (LLaVA-1.5's 'default' strategy and an int layer)"
            )
        tower = self.inner.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return ClipTap(layers, cfg.vision_feature_layer, self.inner.multi_modal_projector)
