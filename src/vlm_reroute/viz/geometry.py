"""Where the cells of an image's token grid sit on the ORIGINAL picture.

The model sees a processed frame (resized, cropped or padded); a picture of routing decisions is
only honest if each cell is drawn over the pixels it actually encodes. This module reads the
image processor's own settings and undoes what it did, for the processors it knows:

* ``CLIPImageProcessor`` / ``LlavaImageProcessor`` (LLaVA-1.5): optional pad-to-square
  (``LlavaImageProcessor.do_pad``), resize (shortest edge, or an exact height × width), optional
  centre crop. The frame is an axis-aligned rectangle in original pixels; with a crop it lies
  inside the picture, with padding it reaches beyond it.
* ``Qwen2VLImageProcessor`` (Qwen2-VL, Qwen2.5-VL): smart-resize of the whole picture to a
  multiple of ``patch_size · merge_size``; the merged grid covers the whole picture, so cells
  map proportionally. The grid recorded in the trace is checked against the processor's
  smart-resize of this picture's size.

Which processor does which is the family adapters' declaration (``image_placements``); this module
knows the three placements. Anything else (other processors, multi-view or crop layouts, separator
tokens) is refused with a message, never drawn wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..adapters import ADAPTERS
from ..adapters.layout import GridView, ImageLayout

Box = tuple[float, float, float, float]

#: Image-processor class -> placement, as the family adapters declare them (``image_placements``).
PLACEMENTS: dict[str, str] = {name: rule for a in ADAPTERS for name, rule in a.image_placements.items()}
KNOWN = tuple(PLACEMENTS)


@dataclass(frozen=True)
class Placement:
    """The token grid of one image placed on the original picture.

    ``frame``: the processed frame ``(x0, y0, x1, y1)`` in original pixel coordinates (x right,
    y down); the grid's ``rows × cols`` cells split it evenly. ``how`` says what was undone. It
    exists so that pictures and box coverage agree on which token covers which pixels, whatever the
    family's resizing, padding or cropping.
    """

    image_size: tuple[int, int]  # (width, height) of the original picture
    frame: Box
    grid: tuple[int, int]
    how: str

    def cell_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Column edges (``cols + 1``) and row edges (``rows + 1``) in original pixels."""
        x0, y0, x1, y1 = self.frame
        rows, cols = self.grid
        return np.linspace(x0, x1, cols + 1), np.linspace(y0, y1, rows + 1)

    def cell_centre(self, row: int, col: int) -> tuple[float, float]:
        xs, ys = self.cell_edges()
        return (xs[col] + xs[col + 1]) / 2, (ys[row] + ys[row + 1]) / 2

    def box_overlap(self, box: Box) -> np.ndarray:
        """``(rows, cols)``: the fraction of each cell's area that lies inside ``box``."""
        xs, ys = self.cell_edges()
        bx0, by0, bx1, by1 = box
        wx = np.clip(np.minimum(xs[1:], bx1) - np.maximum(xs[:-1], bx0), 0, None) / np.diff(xs)
        wy = np.clip(np.minimum(ys[1:], by1) - np.maximum(ys[:-1], by0), 0, None) / np.diff(ys)
        return wy[:, None] * wx[None, :]

    def box_cells(self, box: Box, min_overlap: float = 0.5) -> np.ndarray:
        """Bool ``(rows, cols)``: the cells whose area overlaps ``box`` by at least ``min_overlap``."""
        return self.box_overlap(box) >= min_overlap - 1e-9


def check_box(box: Box, image_size: tuple[int, int]) -> Box:
    """A box ``(x1, y1, x2, y2)`` in original pixels, checked to be non-empty and inside the picture."""
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(
            f"box {x1:g},{y1:g},{x2:g},{y2:g}: need 0 ≤ x1 < x2 ≤ {width} and 0 ≤ y1 < y2 ≤ {height} "
            f"(pixels of the {width}×{height} original image)"
        )
    return x1, y1, x2, y2


def check_single_grid(layout: ImageLayout) -> None:
    """Refuse layouts the pictures do not know (several views / crops, separator tokens)."""
    if len(layout.views) != 1 or layout.extras or layout.views[0].box != GridView(1, 1).box:
        raise ValueError(
            f"image {layout.image} of sample {layout.sample} has {len(layout.views)} views and "
            f"{len(layout.extras)} extra tokens: pictures know single-grid layouts (LLaVA-1.5, "
            "Qwen2-VL, Qwen2.5-VL) only and refuse to draw this one wrong"
        )


def processor_kind(processor: Any) -> str:
    """The known image-processor family of ``processor`` (a processor or an image processor)."""
    image_processor = getattr(processor, "image_processor", processor)
    name = type(image_processor).__name__
    base = name.removesuffix("Fast").removesuffix("Pil")
    if base not in KNOWN:
        raise ValueError(
            f"image processor {name}: pictures know {', '.join(KNOWN)} (and their Pil/Fast variants); "
            "refusing to guess where its cells sit on the picture"
        )
    return base


def placement_for(processor: Any, image_size: tuple[int, int], layout: ImageLayout) -> Placement:
    """Where ``layout``'s grid sits on a picture of ``image_size`` (width, height) processed by
    ``processor`` (the checkpoint's processor or its image processor)."""
    if processor is None:
        raise ValueError(
            "pictures need the checkpoint's processor (processor=...) to place cells on the original "
            "picture: LLaVA crops or pads, Qwen resizes"
        )
    check_single_grid(layout)
    rule = PLACEMENTS[processor_kind(processor)]
    image_processor = getattr(processor, "image_processor", processor)
    if rule == "smart_resize":
        return _qwen_placement(image_processor, image_size, layout)
    return _clip_placement(image_processor, image_size, layout, pad_to_square=rule == "pad_resize_crop")


def _size_get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _qwen_placement(image_processor: Any, image_size: tuple[int, int], layout: ImageLayout) -> Placement:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    width, height = image_size
    size = image_processor.size
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    new_h, new_w = smart_resize(
        height,
        width,
        factor=factor,
        min_pixels=_size_get(size, "shortest_edge"),
        max_pixels=_size_get(size, "longest_edge"),
    )
    grid = (new_h // factor, new_w // factor)
    if grid != layout.grid:
        raise ValueError(
            f"image {layout.image} of sample {layout.sample}: the trace has a "
            f"{layout.grid[0]}×{layout.grid[1]} grid but this processor smart-resizes a {width}×{height} "
            f"picture to {grid[0]}×{grid[1]} merged cells; pass the picture and processor the model ran on"
        )
    how = f"smart-resize {width}×{height} → {new_w}×{new_h} px, merged cells of {factor} px (whole picture)"
    return Placement(image_size, (0.0, 0.0, float(width), float(height)), grid, how)


def _clip_placement(
    image_processor: Any, image_size: tuple[int, int], layout: ImageLayout, pad_to_square: bool
) -> Placement:
    from transformers.image_transforms import get_resize_output_image_size

    width, height = image_size
    pil_backend = type(image_processor).__name__.endswith("Pil")
    steps = []
    # frame of the current image in original pixel coordinates, and its size in current pixels
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    cur_w, cur_h = width, height
    do_pad = getattr(image_processor, "do_pad", None)
    if do_pad and not pad_to_square:
        raise ValueError(
            f"{type(image_processor).__name__} with do_pad=True pads after processing; pictures know "
            "a pad to a square before the resize only (LlavaImageProcessor's)"
        )
    if do_pad:
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2
        x0, y0, x1, y1 = -left, -top, side - left, side - top
        cur_w = cur_h = side
        steps.append(f"pad to {side}×{side}")
    if getattr(image_processor, "do_resize", False):
        size = image_processor.size
        if _size_get(size, "shortest_edge") and not _size_get(size, "longest_edge"):
            dummy = np.empty((1, cur_h, cur_w), dtype=np.uint8)
            new_h, new_w = get_resize_output_image_size(
                dummy,
                size=_size_get(size, "shortest_edge"),
                default_to_square=False,
                input_data_format="channels_first",
            )
        elif _size_get(size, "height") and _size_get(size, "width"):
            new_h, new_w = int(_size_get(size, "height")), int(_size_get(size, "width"))
        else:
            raise ValueError(
                f"{type(image_processor).__name__} size={size}: pictures know"
                " a shortest-edge or a height×width resize"
            )
        steps.append(f"resize to {new_w}×{new_h}")
        cur_w, cur_h = new_w, new_h
    scale_x, scale_y = (x1 - x0) / cur_w, (y1 - y0) / cur_h  # original pixels per current pixel
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        crop_h, crop_w = int(_size_get(crop, "height")), int(_size_get(crop, "width"))
        left, top = _crop_offset(cur_w, crop_w, pil_backend), _crop_offset(cur_h, crop_h, pil_backend)
        x0, y0 = x0 + left * scale_x, y0 + top * scale_y
        x1, y1 = x0 + crop_w * scale_x, y0 + crop_h * scale_y
        cur_w, cur_h = crop_w, crop_h
        steps.append(f"centre crop {crop_w}×{crop_h}")
    rows, cols = layout.grid
    if cur_h % rows or cur_w % cols or cur_h // rows != cur_w // cols:
        raise ValueError(
            f"image {layout.image} of sample {layout.sample}: a {rows}×{cols} grid does not tile the "
            f"{cur_w}×{cur_h} processed frame in square patches; pass the processor the model ran on"
        )
    how = ", ".join(steps) or "no change"
    return Placement(image_size, (x0, y0, x1, y1), (rows, cols), how + f", {cur_h // rows} px patches")


def _crop_offset(size: int, crop: int, pil_backend: bool) -> int:
    """Left/top offset of a centre crop (negative: the crop pads), as the two backends compute it."""
    if crop <= size:
        return (size - crop) // 2
    return -math.ceil((crop - size) / 2) if pil_backend else -((crop - size) // 2)
