"""Image layouts: where each image's visual tokens sit in a prompt and which grid cell each one shows.

Adapters build them (family knowledge: grids, crops, newline or separator tokens); the trace
keeps the layout of the last prefill so that pictures, Nüwa's spatial rules and evaluation read
one description instead of guessing from token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GridView:
    """One grid of cells an image is shown as: the whole image, or one crop / tile of it.

    ``box`` is the region of the processed image the view covers, as fractions
    ``(x0, y0, x1, y1)``; a base view covers ``(0, 0, 1, 1)``; ``None`` when the model's inputs do
    not say (InternVL tiles: the processor keeps their count, not their grid).
    """

    rows: int
    cols: int
    box: tuple[float, float, float, float] | None = (0.0, 0.0, 1.0, 1.0)

    @property
    def cells(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class ImageLayout:
    """One image of one sample.

    ``offset``/``length``: the image's visual tokens are ``offset .. offset+length-1`` in the
    sample's visual-token numbering (the numbering of ``trace.decisions[i].selected``, in sequence
    order over all images of the sample). ``span``: first and one-past-last sequence position (in
    the batch's padded coordinates) covering the image. Its tokens show ``views`` in order, each in
    raster order, except the ``extras`` (indices within the image: newline or separator tokens
    that are visual but no grid cell).
    """

    sample: int
    image: int
    offset: int
    length: int
    span: tuple[int, int]
    views: tuple[GridView, ...]
    extras: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        cells = sum(v.cells for v in self.views) + len(self.extras)
        if cells != self.length:
            grids = [(v.rows, v.cols) for v in self.views]
            raise ValueError(
                f"image {self.image} of sample {self.sample}: {self.length} visual tokens but its views "
                f"{grids} and {len(self.extras)} extra tokens describe {cells}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Rows × cols of the base view (after merging)."""
        return self.views[0].rows, self.views[0].cols

    def token_cells(self) -> torch.Tensor:
        """Long ``(length, 2)``: per token, its view index and raster cell index (``-1, -1`` for extras)."""
        out = torch.full((self.length, 2), -1, dtype=torch.long)
        is_cell = torch.ones(self.length, dtype=torch.bool)
        if self.extras:
            is_cell[list(self.extras)] = False
        sizes = torch.tensor([v.cells for v in self.views])
        view = torch.repeat_interleave(torch.arange(len(self.views)), sizes)
        starts = sizes.cumsum(0) - sizes
        out[is_cell, 0] = view
        out[is_cell, 1] = torch.arange(int(sizes.sum())) - starts[view]
        return out


def single_view_layouts(image_ids: torch.Tensor, grids: list[tuple[int, int]]) -> list[list[ImageLayout]]:
    """Layouts for families where each image is one grid of ``grids[i]`` cells, no extra tokens.

    ``image_ids``: ``(B, N)`` global image index per visual token (``-1`` elsewhere), as adapters
    return it; ``grids`` is indexed by that global image index.
    """
    visual = image_ids >= 0
    positions = torch.arange(image_ids.shape[1], device=image_ids.device).expand_as(image_ids)
    n_images = len(grids)
    flat_ids = image_ids[visual]
    flat_pos = positions[visual]
    lowest = torch.full((n_images,), image_ids.shape[1], dtype=torch.long, device=image_ids.device)
    highest = torch.full((n_images,), -1, dtype=torch.long, device=image_ids.device)
    first: list[int] = lowest.scatter_reduce(0, flat_ids, flat_pos, "amin").tolist()
    last: list[int] = highest.scatter_reduce(0, flat_ids, flat_pos, "amax").tolist()
    sizes: list[int] = torch.bincount(flat_ids, minlength=n_images).tolist()
    sample_of = visual.nonzero()[:, 0]
    nobody = torch.zeros(n_images, dtype=torch.long, device=image_ids.device)
    owner: list[int] = nobody.scatter(0, flat_ids, sample_of).tolist()
    out: list[list[ImageLayout]] = [[] for _ in range(image_ids.shape[0])]
    for g in range(n_images):  # a loop over images, not tokens
        sample = owner[g]
        offset = sum(layout.length for layout in out[sample])
        rows, cols = grids[g]
        out[sample].append(
            ImageLayout(
                sample=sample,
                image=len(out[sample]),
                offset=offset,
                length=sizes[g],
                span=(first[g], last[g] + 1),
                views=(GridView(rows, cols),),
            )
        )
    return out
