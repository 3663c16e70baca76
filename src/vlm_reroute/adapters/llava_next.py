"""LLaVA-NeXT (anyres) and LLaVA-OneVision (anyres-max): a base view plus a grid of crops, with newlines.

Each image is one run of ``<image>`` placeholders filled by ``pack_image_features``
(``modeling_llava_next.py``, OneVision's copy): first the **base view** (the whole image at the
vision tower's size, ``side × side`` tokens, ``side = image_size / patch_size``), then the
**crop grid**: the crops chosen by ``select_best_resolution`` among ``image_grid_pinpoints``
stitched into one ``(rows·side) × (cols·side)`` map, unpadded to the image's aspect ratio
(``unpad_image``), for OneVision shrunk bilinearly when it exceeds ``anyres_max_N`` base crops by
10%, and one ``image_newline`` token appended to every row. OneVision images that share a prompt
with others (``batch_num_images`` > 1) and LLaVA-NeXT single-patch images get the base view and
one newline only. The crop grid covers the whole image, so it is one view: a row of it crosses
every crop of that row, and crops are not contiguous spans.

Newlines are routed as visual tokens. They carry the ``<image>`` id and sit inside the image's
span, the published FastV / PDrop ports (which rank every ``<image>`` position alike) route them,
and the token counts users and the budget tables quote for these models include them; so keep
counts, avg_T and KV budgets mean the same here as there. Each newline is an ``extras`` entry of
the image's layout (visual, but no grid cell). Keep counts apply per image over the base view,
all crops and its newlines together.

The layout comes from ``image_sizes`` and the config's grid rules when the call has
``pixel_values``; inside ``generate()`` the images are encoded beforehand and only the packed
features arrive (``mm_encoder_outputs``), so the layout is read from them: the newline rows are
exactly the model's ``image_newline`` vector. Video tokens (OneVision's ``<video>``) are not routed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.image_processing_utils import select_best_resolution

from .base import ModelAdapter
from .layout import GridView, ImageLayout
from .views import ImageShape, ids_from_lengths, layouts_with_views

if TYPE_CHECKING:
    from .vision_views import AnyresTap


def unpadded_size(image_size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """Rows × cols left of a ``height × width`` feature map by ``unpad_image`` for an image of
    ``image_size`` (original height, width)."""
    original_height, original_width = image_size
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        return height - 2 * ((height - new_height) // 2), width
    new_width = int(round(original_width * (height / original_height), 7))
    return height, width - 2 * ((width - new_width) // 2)


class LlavaNextAdapter(ModelAdapter):
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
    prompt_classes = ("LlavaOnevisionForConditionalGeneration",)  # LlavaNextProcessor has no video processor

    @property
    def onevision(self) -> bool:
        return type(self.model).__name__ == "LlavaOnevisionForConditionalGeneration"

    @property
    def side(self) -> int:
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def check(self) -> None:
        super().check()
        window = getattr(self.text_config, "sliding_window", None)
        if window is not None and not getattr(self.text_config, "layer_types", None):
            raise ValueError(
                f"{type(self.model).__name__} with a {window}-token sliding window: routing builds plain "
                "causal masks (LLaVA-NeXT-Mistral checkpoints set sliding_window to null)"
            )

    # ---- one image ----------------------------------------------------------------------------
    def _shape(self, grid: tuple[int, int] | None) -> ImageShape:
        """Base view, then the crop grid of ``rows × cols`` with a newline after each row (or, with
        ``grid=None``, the base view and one newline)."""
        base = GridView(self.side, self.side)
        if grid is None:
            return ImageShape((base,), (self.side**2,))
        rows, cols = grid
        newlines = tuple(self.side**2 + r * (cols + 1) + cols for r in range(rows))
        return ImageShape((base, GridView(rows, cols)), newlines)

    def _grid_from_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The crop grid's rows × cols for an image of ``image_size``: the model's packing arithmetic."""
        cfg = self.config
        crop = int(cfg.vision_config.image_size)
        best_h, best_w = select_best_resolution(image_size, cfg.image_grid_pinpoints)
        rows, cols = unpadded_size(image_size, best_h // crop * self.side, best_w // crop * self.side)
        if self.onevision:
            aspect = getattr(cfg, "vision_aspect_ratio", "anyres_max_9")
            ratio = math.sqrt(rows * cols / (int(aspect.removeprefix("anyres_max_")) * self.side**2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def _shapes_from_sizes(self, model_kwargs: dict[str, Any]) -> list[ImageShape]:
        sizes = model_kwargs["image_sizes"].tolist()
        patching = [True] * len(sizes)
        counts = model_kwargs.get("batch_num_images")
        if self.onevision and counts is not None:  # several images in a prompt: base view only
            patching = [int(n) == 1 for n in counts for _ in range(int(n))]
            if len(patching) != len(sizes):
                raise ValueError(
                    f"batch_num_images={counts.tolist()} describes {len(patching)} images but image_sizes "
                    f"has {len(sizes)}"
                )
        return [
            self._shape(self._grid_from_size(tuple(s)) if patch else None)
            for s, patch in zip(sizes, patching, strict=True)
        ]

    def _shapes_from_features(self, features: list[torch.Tensor]) -> list[ImageShape]:
        """Shapes read from packed image features: their newline rows equal ``image_newline``."""
        newline = self.inner.image_newline
        base = self.side**2
        shapes = []
        for i, feature in enumerate(features):
            is_newline = (feature[base:] == newline.to(feature)).all(dim=-1).nonzero().flatten()
            length, rows = feature.shape[0] - base, int(is_newline.numel())
            if length == 1 and rows == 1:
                shapes.append(self._shape(None))
                continue
            cols = length // rows - 1 if rows else -1
            shape = self._shape((rows, cols)) if rows and cols > 0 and rows * (cols + 1) == length else None
            if shape is None or [e - base for e in shape.extras] != is_newline.tolist():
                raise ValueError(
                    f"image {i}: its {feature.shape[0]} features do not follow the LLaVA-NeXT packing "
                    f"(a {self.side}x{self.side} base view, then rows each ending in image_newline)"
                )
            shapes.append(shape)
        return shapes

    def image_shapes(self, model_kwargs: dict[str, Any]) -> list[ImageShape]:
        """Every image of the call, in batch order."""
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return self._shapes_from_features(list(encoded.pooler_output))
        if model_kwargs.get("image_sizes") is None:
            raise ValueError(
                f"{type(self.model).__name__} routing needs image_sizes (the processor returns it with "
                "pixel_values) to lay out each image's base view and crops"
            )
        return self._shapes_from_sizes(model_kwargs)

    def expand_images(
        self, tokenizer: Any, image_processor: Any, images: Sequence[Sequence[Any]], placeholder: str
    ) -> tuple[dict[str, Any], list[str]]:
        """LLaVA-OneVision: ``<image>`` × (base view + unpadded crop grid + one newline per row), or
        base view + one newline for images that share a prompt (``batch_num_images``)."""
        vision = dict(image_processor(images=[list(row) for row in images], return_tensors="pt"))
        return vision, [placeholder * shape.length for shape in self.image_shapes(vision)]

    # ---- the adapter contract -------------------------------------------------------------------
    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        lengths = [s.length for s in self.image_shapes(model_kwargs)]
        return ids_from_lengths(self.visual_mask(input_ids), lengths, "image_sizes and the anyres grid rules")

    def image_grids(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        return [(self.side, self.side)] * (int(image_ids.max()) + 1)

    def image_layouts(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[ImageLayout]]:
        return layouts_with_views(image_ids, self.image_shapes(model_kwargs))

    def vision_tap(self) -> AnyresTap:
        """Per crop: the [CLS] row of the feature-layer block (a CLIP tower, ``"default"`` strategy:
        LLaVA-NeXT) or the attention received in block −2 (a tower without [CLS], ``"full"`` strategy:
        OneVision's SigLIP), and that block's keys; mapped to tokens by the family's own
        ``pack_image_features`` (``vision_views.py``)."""
        from .vision_views import AnyresTap

        cfg, tower = self.config, self.inner.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        depth, layer = len(layers), cfg.vision_feature_layer
        strategy = cfg.vision_feature_select_strategy
        has_cls = (
            getattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding", None) is not None
        )
        if not isinstance(layer, int) or layer == 0 or not -depth <= layer <= depth:
            raise ValueError(
                f"vision_feature_layer={layer!r}: a stage-1 salience reads one block of the {depth}-block "
                f"tower (one int in [-{depth}, -1] or [1, {depth}])"
            )
        if has_cls != (strategy == "default"):
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} on a tower {'with' if has_cls else 'without'} "
                "a [CLS] token: a stage-1 salience needs the [CLS] token dropped ('default') or a tower "
                "without one ('full')"
            )
        if has_cls:  # VisionZip's signal: the [CLS] row of the block producing the feature layer
            return AnyresTap(self.inner, layers[layer % (depth + 1) - 1], "cls", self.side)
        return AnyresTap(self.inner, layers[max(-2, -depth)], "received", self.side)
