"""Helpers the multi-view adapters share: images from per-image token counts, layouts with several views.

LLaVA-NeXT / OneVision, InternVL and Idefics3 know how many visual tokens each image has (from
``image_sizes``, tile counts or the image features) but an image is not always one contiguous
run: Idefics3 separates tiles with text tokens. These helpers number the visual tokens by image
from the counts, and build :class:`~vlm_reroute.engine.layout.ImageLayout` objects with several
views and extra (newline) tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from .layout import GridView, ImageLayout, single_view_layouts


@dataclasses.dataclass(frozen=True)
class ImageShape:
    """What one image shows: its views in token order and the indices (within the image) of its
    visual tokens that are no grid cell (newlines)."""

    views: tuple[GridView, ...]
    extras: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return sum(v.cells for v in self.views) + len(self.extras)


def ids_from_lengths(visual: torch.Tensor, lengths: list[int], what: str) -> torch.Tensor:
    """Global image index ``(B, N)`` (``-1`` off images) when image ``g`` holds the next
    ``lengths[g]`` visual tokens, in row-major order over the batch.

    ``what`` names the source of the counts in the error raised when they do not fit the prompt.
    """
    total = int(visual.sum())
    if sum(lengths) != total:
        raise ValueError(
            f"the prompts hold {total} image tokens but {what} gives {len(lengths)} images of "
            f"{lengths} tokens ({sum(lengths)} in all)"
        )
    sizes = torch.tensor(lengths, dtype=torch.long, device=visual.device)
    flat = torch.repeat_interleave(torch.arange(len(lengths), device=visual.device), sizes)
    sample = visual.nonzero()[:, 0]
    first = sizes.cumsum(0) - sizes
    last = sizes.cumsum(0) - 1
    split = (sample[first] != sample[last]).nonzero().flatten().tolist()
    if split:
        raise ValueError(
            f"image {split[0]} ({lengths[split[0]]} tokens by {what}) would span two prompts of the "
            "batch: the image tokens of each prompt must match its own images"
        )
    ids = torch.full_like(visual, -1, dtype=torch.long)
    ids[visual] = flat
    return ids


def layouts_with_views(image_ids: torch.Tensor, shapes: list[ImageShape]) -> list[list[ImageLayout]]:
    """Layouts (per sample, per image) of images described by ``shapes`` (indexed by global image)."""
    plain = single_view_layouts(image_ids, [(s.length, 1) for s in shapes])
    out: list[list[ImageLayout]] = []
    g = 0
    for sample in plain:
        row = []
        for layout in sample:
            shape = shapes[g]
            row.append(dataclasses.replace(layout, views=shape.views, extras=shape.extras))
            g += 1
        out.append(row)
    return out
