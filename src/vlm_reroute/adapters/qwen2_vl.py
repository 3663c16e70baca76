"""Qwen2-VL and Qwen2.5-VL: Qwen2 decoder with GQA and 3-axis MRoPE, dynamic tokens per image.

Each image is one run of ``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``,
its grid ``image_grid_thw / spatial_merge_size`` in raster order. Video tokens are not routed
(they go through every layer like text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import ModelAdapter

if TYPE_CHECKING:
    from .vision import MergerTap


class Qwen2VLAdapter(ModelAdapter):
    model_classes: tuple[str, ...] = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    prompt_classes: tuple[str, ...] = model_classes
    token_type_ids = True
    image_placements = {"Qwen2VLImageProcessor": "smart_resize"}

    def expand_images(
        self, tokenizer: Any, image_processor: Any, images: Sequence[Sequence[Any]], placeholder: str
    ) -> tuple[dict[str, Any], list[str]]:
        """``<|image_pad|>`` × ``t·h·w / merge²`` per image (the Qwen2-VL / Qwen2.5-VL / Qwen3-VL /
        Qwen3.5 processors' rule)."""
        vision = dict(image_processor(images=[image for row in images for image in row], return_tensors="pt"))
        merge = image_processor.merge_size
        return vision, [placeholder * (int(g.prod()) // merge**2) for g in vision["image_grid_thw"]]

    def vision_tap(self) -> MergerTap:
        """Attention received in ViT block −2 and its keys, per merged token; rows from the merger
        (``vision.py``; Qwen3-VL and Qwen3.5 inherit it: same blocks, same merger)."""
        from .vision import MergerTap

        return MergerTap(self.inner.visual)

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

    def image_grids(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        """From ``image_grid_thw`` when given, else from the MRoPE position ids: ``generate()``
        encodes the images beforehand and passes ``mm_encoder_outputs`` and ``position_ids``
        instead of the grids (an image's height/width ids run over its rows/cols)."""
        sizes = torch.bincount(image_ids[image_ids >= 0]).tolist()
        grid = model_kwargs.get("image_grid_thw")
        if grid is not None:
            merge = int(self.config.vision_config.spatial_merge_size)
            grids = [(t, h // merge, w // merge) for t, h, w in grid.tolist()]
        else:
            grids = self._grids_from_positions(image_ids, model_kwargs.get("position_ids"), len(sizes))
        for i, (t, rows, cols) in enumerate(grids):
            if t != 1 or rows * cols != sizes[i]:
                raise ValueError(
                    f"image {i}: its grid is {t}×{rows}×{cols} merged tokens but the prompt holds "
                    f"{sizes[i]} <|image_pad|> tokens for it"
                )
        return [(rows, cols) for _, rows, cols in grids]

    @staticmethod
    def _grids_from_positions(
        image_ids: torch.Tensor, position_ids: torch.Tensor | None, n_images: int
    ) -> list[tuple[int, int, int]]:
        if position_ids is None or position_ids.ndim != 3:
            raise ValueError(
                "Qwen2-VL routing needs image_grid_thw (the processor returns it) or the model's 3-D "
                "position_ids to lay out images"
            )
        visual = image_ids >= 0
        ids = image_ids[visual]
        spans = []
        for axis in position_ids[-3:]:  # (t, h, w); a leading text-position row is skipped
            values = axis.expand_as(image_ids)[visual].long()
            low = torch.full((n_images,), 2**62, dtype=torch.long).scatter_reduce(0, ids, values, "amin")
            high = torch.full((n_images,), -1, dtype=torch.long).scatter_reduce(0, ids, values, "amax")
            spans.append((high - low + 1).tolist())
        return list(zip(*spans, strict=True))
