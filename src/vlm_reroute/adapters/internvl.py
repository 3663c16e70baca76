"""InternVL3 (``InternVLForConditionalGeneration``): Qwen2 decoder, images as tiles of a fixed token grid.

The processor (``processing_internvl.py``) writes each image as ``<img>`` + ``<IMG_CONTEXT>`` ×
(tokens per tile · tiles) + ``</img>``; only ``<IMG_CONTEXT>`` (``config.image_token_id``) gets
features, so each image is one run of visual tokens and the delimiters stay text. The tiles come
from ``GotOcr2ImageProcessor.crop_image_to_patches``: the image resized to a grid of tiles chosen
by aspect ratio (up to ``max_patches``), row-major, then — when there is more than one tile — a
thumbnail of the whole image, last. Each tile shows ``(image_size / patch) · downsample_ratio``
squared tokens (InternViT patches after the 0.5 pixel shuffle: 16 × 16 = 256 at 448 px).

The tile grid's rows and columns are not among the model's inputs (the processor keeps
``num_patches`` only), so tiles are views in processor order whose ``box`` is ``None`` (unknown
region); the thumbnail and a lone tile cover the whole image. Keep counts apply per image over all
its tiles and the thumbnail. Video frames (``Frame{i}: <img>…</img>``) are one-tile images each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import ModelAdapter
from .layout import GridView, ImageLayout
from .views import ImageShape, layouts_with_views

if TYPE_CHECKING:
    from .vision_prompt import PromptTap


def runs_of(visual: torch.Tensor) -> torch.Tensor:
    """Global index ``(B, N)`` of every maximal run of ``True`` in ``visual`` (row-major), ``-1`` off runs."""
    previous = torch.nn.functional.pad(visual[:, :-1], (1, 0), value=False)
    starts = visual & ~previous
    ids = starts.flatten().cumsum(0).view_as(visual) - 1
    return torch.where(visual, ids, torch.full_like(ids, -1))


class InternVLAdapter(ModelAdapter):
    model_classes = ("InternVLForConditionalGeneration",)
    prompt_classes = model_classes

    def expand_images(
        self, tokenizer: Any, image_processor: Any, images: Sequence[Sequence[Any]], placeholder: str
    ) -> tuple[dict[str, Any], list[str]]:
        """``<img>`` + ``<IMG_CONTEXT>`` × (tokens per tile · tiles) + ``</img>`` per image."""
        vision = dict(image_processor(images=[image for row in images for image in row], return_tensors="pt"))
        rows, cols = self.tile_grid
        start = getattr(tokenizer, "start_image_token", "<img>")
        end = getattr(tokenizer, "end_image_token", "</img>")
        return vision, [start + placeholder * rows * cols * int(n) + end for n in vision.pop("num_patches")]

    @property
    def tile_grid(self) -> tuple[int, int]:
        """Rows × cols of one tile's tokens after the pixel shuffle."""
        cfg = self.config
        vision = cfg.vision_config
        size, patch = vision.image_size, vision.patch_size
        size = size if isinstance(size, list | tuple) else (size, size)
        patch = patch if isinstance(patch, list | tuple) else (patch, patch)
        ratio = float(cfg.downsample_ratio)
        return int(size[0] // patch[0] * ratio), int(size[1] // patch[1] * ratio)

    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        ids = runs_of(self.visual_mask(input_ids))
        rows, cols = self.tile_grid
        per_tile = rows * cols
        sizes = torch.bincount(ids[ids >= 0])
        if bool((sizes % per_tile != 0).any()):
            raise ValueError(
                f"image token runs of {sizes.tolist()} tokens: each InternVL image is a run of "
                f"<IMG_CONTEXT> tokens, {per_tile} per tile ({rows}×{cols})"
            )
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is not None and int(sizes.sum()) != pixel_values.shape[0] * per_tile:
            raise ValueError(
                f"{int(sizes.sum())} image tokens for {pixel_values.shape[0]} tiles of {per_tile} tokens: "
                "each image must be one run of its tiles' tokens"
            )
        return ids

    def image_grids(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        return [self.tile_grid] * (int(image_ids.max()) + 1)

    def image_layouts(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[ImageLayout]]:
        rows, cols = self.tile_grid
        shapes = []
        for size in torch.bincount(image_ids[image_ids >= 0]).tolist():
            tiles = size // (rows * cols)
            if tiles == 1:
                shapes.append(ImageShape((GridView(rows, cols),)))
            else:  # tiles of unknown placement, then the thumbnail
                crops = tuple(GridView(rows, cols, box=None) for _ in range(tiles - 1))
                shapes.append(ImageShape((*crops, GridView(rows, cols))))
        return layouts_with_views(image_ids, shapes)

    def vision_tap(self) -> PromptTap:
        """Per tile (InternViT has a [CLS] token): the [CLS] row of the feature-layer block summed over
        heads and that block's keys, each token the mean over the patches the 0.5 pixel shuffle puts in
        it; tiles grouped into images by the prompt's runs (``vision_prompt.PromptTap``)."""
        from .vision_prompt import PromptTap, internvit_cls, shuffled_mean, visual_tokens_per_image
        from .vision_views import ViewReader

        cfg, inner = self.config, self.inner
        layers = inner.vision_tower.encoder.layer
        depth, layer = len(layers), cfg.vision_feature_layer
        rows, cols = self.tile_grid
        if cfg.vision_feature_select_strategy != "default" or not isinstance(layer, int) or rows != cols:
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}, "
                f"vision_feature_layer={layer!r}, tiles of {rows}x{cols} tokens: a stage-1 salience needs "
                "the [CLS] token dropped ('default'), one int feature layer and square tiles"
            )
        if layer == 0 or not -depth <= layer <= depth:
            raise ValueError(f"vision_feature_layer={layer}: one block of the {depth}-block tower")
        ratio = float(cfg.downsample_ratio)
        unit = round(1 / ratio**2)

        def shuffle(values: torch.Tensor) -> torch.Tensor:
            side = int(round(values.shape[1] ** 0.5))
            grid = values.reshape(values.shape[0], side, side, values.shape[-1])
            return inner.pixel_shuffle(grid, scale_factor=ratio).reshape(values.shape[0], rows * cols, -1)

        def to_tokens(salience: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return shuffled_mean(salience[..., None], shuffle, unit)[..., 0], shuffled_mean(
                keys, shuffle, unit
            )

        def tokens_per_image(input_ids: torch.Tensor) -> list[int]:
            if not bool(self.visual_mask(input_ids).any()):
                return []
            return visual_tokens_per_image(self.image_ids(input_ids, {}))

        reader = ViewReader(layers[layer % (depth + 1) - 1], internvit_cls)
        return PromptTap(self.model, inner, reader, to_tokens, rows, tokens_per_image, "cls")
