"""Idefics3 and SmolVLM: Llama decoder (``model.model.text_model``), images split into tiles + a global view.

The processors (``processing_idefics3.py``, SmolVLM's ``get_image_prompt_string``) write an image
split into ``rows × cols`` tiles as, row by row, ``<fake_token_around_image><row_r_col_c>`` +
``<image>`` × N per tile and ``\\n`` after each row, then ``\\n<fake_token_around_image><global-img>``
+ ``<image>`` × N + ``<fake_token_around_image>``: tiles row-major, the global view (the whole
image at one tile's size) last; an unsplit image is the global part only. N = ``image_seq_len``
tokens per tile (a ``√N × √N`` grid after the pixel shuffle: 169 for Idefics3-8B, 81 for
SmolVLM-2B). Only ``<image>`` is visual: each tile is its own run and the separators between
tiles stay text (they go through every layer). All the runs of one image are one image: keep
counts apply over its tiles and its global view together.

The model's inputs do not name the tags, so the adapter reads the structure from the token ids
the processor wrote: the tag before each sample's last run is ``<global-img>`` (every image ends
with its global view), which closes an image; the token after a global run is
``<fake_token_around_image>``; a tile that follows another tile after only that token and its tag
is in the same row, one that follows a newline starts a new row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import ModelAdapter
from .internvl import runs_of
from .layout import GridView, ImageLayout
from .views import ImageShape, layouts_with_views

if TYPE_CHECKING:
    from .vision_prompt import PromptTap


class Idefics3Adapter(ModelAdapter):
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    prompt_classes = model_classes

    def expand_images(
        self, tokenizer: Any, image_processor: Any, images: Sequence[Sequence[Any]], placeholder: str
    ) -> tuple[dict[str, Any], list[str]]:
        """``get_image_prompt_string`` per image: its tiles row by row, then the global view."""
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        vision = dict(
            image_processor(
                images=[list(row) for row in images], return_tensors="pt", return_row_col_info=True
            )
        )
        fake = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        global_token = getattr(tokenizer, "global_image_token", "<global-img>")
        per_tile = int(self.inner.image_seq_len)
        grids = zip(
            [r for row in vision.pop("rows") for r in row],
            [c for col in vision.pop("cols") for c in col],
            strict=True,
        )
        pieces = [get_image_prompt_string(r, c, per_tile, fake, placeholder, global_token) for r, c in grids]
        return vision, pieces

    @property
    def decoder(self) -> nn.Module:
        return self.inner.text_model

    @property
    def tile_side(self) -> int:
        """Tokens per side of one tile (the square root of ``image_seq_len``)."""
        per_tile = int(self.inner.image_seq_len)
        side = math.isqrt(per_tile)
        if side * side != per_tile:
            raise ValueError(f"image_seq_len={per_tile} is not a square grid of tokens")
        return side

    # ---- reading the processor's structure -------------------------------------------------------
    def _runs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
        """Run index ``(B, N)``, and per run: its sample, first and one-past-last position."""
        visual = self.visual_mask(input_ids)
        runs = runs_of(visual)
        flat = runs[visual]
        positions = visual.nonzero()
        n_runs = int(flat.max()) + 1
        first_flat = torch.full((n_runs,), visual.numel(), dtype=torch.long, device=visual.device)
        first_flat = first_flat.scatter_reduce(
            0, flat, torch.arange(flat.numel(), device=visual.device), "amin"
        )
        sizes = torch.bincount(flat, minlength=n_runs)
        per_tile = self.tile_side**2
        if bool((sizes != per_tile).any()):
            raise ValueError(
                f"runs of {sorted(set(sizes.tolist()))} <image> tokens: Idefics3 / SmolVLM prompts hold one "
                f"run of {per_tile} tokens per tile (image_seq_len)"
            )
        sample = positions[first_flat, 0].tolist()
        start = positions[first_flat, 1].tolist()
        return runs, sample, start, [s + per_tile for s in start]

    def _images(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[ImageShape]]:
        """Image index ``(B, N)`` of every visual token, and the shape of every image."""
        runs, sample, start, end = self._runs(input_ids)
        n_runs = len(sample)
        tags = [int(input_ids[s, p - 1]) if p > 0 else -1 for s, p in zip(sample, start, strict=True)]
        last_runs = sorted({s: r for r, s in enumerate(sample)}.values())  # the last run of every sample
        global_tags = {tags[r] for r in last_runs}
        if len(global_tags) != 1 or -1 in global_tags:
            raise ValueError(
                "cannot find the global image of each prompt: the token before the last image run of "
                f"every prompt must be the same <global-img> tag, found ids {sorted(global_tags)}"
            )
        global_tag = global_tags.pop()
        closers = {
            int(input_ids[sample[r], end[r]]) if end[r] < input_ids.shape[1] else -1 for r in last_runs
        }
        fake = closers.pop() if len(closers) == 1 else -1
        image_of_run: list[int] = []
        groups: list[list[int]] = [[]]
        for r in range(n_runs):
            image_of_run.append(len(groups) - 1)
            groups[-1].append(r)
            if tags[r] == global_tag and r != n_runs - 1:
                groups.append([])
        shapes = []
        for runs_of_image in groups:
            tiles = runs_of_image[:-1]
            # a tile right after "<fake_token_around_image><row_r_col_c>" continues the row; else a new row
            new_row = [int(input_ids[sample[r], end[p]]) != fake for p, r in pairwise(tiles)]
            shapes.append(self._shape(len(tiles), new_row))
        lookup = torch.tensor(image_of_run, dtype=torch.long, device=input_ids.device)
        ids = torch.where(runs >= 0, lookup[runs.clamp(min=0)], runs)
        return ids, shapes

    def _shape(self, tiles: int, new_row: list[bool]) -> ImageShape:
        """Tiles (placed in their grid when the row breaks give one) and the global view last."""
        side = self.tile_side
        rows = 1 + sum(new_row)
        cols = tiles // rows if tiles else 0
        starts = [0] + [i + 1 for i, brk in enumerate(new_row) if brk]
        regular = tiles == rows * cols and starts == list(range(0, tiles, cols or 1))[:rows]
        views = []
        for t in range(tiles):
            r, c = divmod(t, cols) if regular else (0, 0)
            box = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) if regular else None
            views.append(GridView(side, side, box=box))
        return ImageShape((*views, GridView(side, side)))

    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        return self._images(input_ids)[0]

    def image_grids(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        return [(self.tile_side, self.tile_side)] * (int(image_ids.max()) + 1)

    def image_layouts(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[ImageLayout]]:
        """Needs ``model_kwargs["input_ids"]`` (the executor passes it): the tile rows are read from
        the separators between tiles."""
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("Idefics3 / SmolVLM layouts are read from the prompt: pass input_ids")
        return layouts_with_views(image_ids, self._images(input_ids)[1])

    def vision_tap(self) -> PromptTap:
        """Per view (tiles, global view): the attention each patch receives in block −2 of the SigLIP-like
        tower (no [CLS]: ``methods.md`` §4's substitute) and that block's keys, each token the mean over
        the patches the connector's pixel shuffle puts in it; views grouped into images by the prompt's
        tags (``vision_prompt.PromptTap``)."""
        from .vision_prompt import PromptTap, shuffled_mean, visual_tokens_per_image
        from .vision_views import ViewReader, received_rows

        inner = self.inner
        layers = inner.vision_model.encoder.layers
        connector = inner.connector
        scale = int(connector.scale_factor)

        def shuffle(values: torch.Tensor) -> torch.Tensor:
            return connector.pixel_shuffle(values, scale)

        def to_tokens(salience: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            unit = scale * scale
            return shuffled_mean(salience[..., None], shuffle, unit)[..., 0], shuffled_mean(
                keys, shuffle, unit
            )

        def tokens_per_image(input_ids: torch.Tensor) -> list[int]:
            if not bool(self.visual_mask(input_ids).any()):
                return []
            return visual_tokens_per_image(self._images(input_ids)[0])

        reader = ViewReader(layers[max(-2, -len(layers))], received_rows)
        return PromptTap(self.model, inner, reader, to_tokens, self.tile_side, tokens_per_image, "received")
