"""Nüwa stage 1 inside a model: hooks that select and aggregate anchors while the images are encoded.

The engine's vision-side stage for Nüwa (arXiv 2602.02951; ``engine/vision.py`` explains how it
enters the engine). One installer per tower kind, the kind the family table declares for the model
(``Family.vision``; ``nuwa.md`` §1.1, §3.1):

- a CLIP tower (LLaVA-1.5): :class:`~.signals.ClipSignalHooks` read the [CLS] row and the
  similarity features while the tower runs; a pre-hook on the multimodal projector selects the
  anchors and rewrites the aggregated ones *before* the projector, which then projects them as usual.
- a windowed ViT (Qwen2.5-VL): :class:`~.signals.QwenSignalHooks` read the received attention of
  the last block and the similarity features; a hook on the tower's output rewrites the merged
  embeddings (aggregation *after* the patch merger).

Each encoding reports every image (:class:`~vlm_reroute.engine.vision.EncodedImage`): the features
the language model receives, the anchors as the tokens that enter it, the salience, the stage-2
counts and a :class:`Stage1Record` for the trace.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...adapters.base import by_name
from ...budget.stage1 import CLIP, MERGER_VIT, WINDOWED_VIT
from ...engine.vision import EncodedImage
from .aggregate import run_stage1
from .signals import ClipSignalHooks, QwenSignalHooks, check_image_grids, check_llava_config, square_grid

if TYPE_CHECKING:
    from .method import ImagePlan, Nuwa


@dataclass(frozen=True)
class Stage1Record:
    """What stage 1 decided for one image (``trace.stage1[sample][image]``).

    ``anchors``: raster indices into the image's ``grid`` (rows × cols of its tokens), ascending;
    ``aggregated``: per anchor, True when it absorbed other tokens (its salience is below the gate
    ``threshold`` θ); ``k1``: anchors asked for (an odd Qwen grid may keep fewer: anchors on padding
    are dropped); ``n_per_cell``: candidates per 2×2 cell. An image whose K₁ covers every token skips
    stage 1 (every token an anchor, none aggregated, θ = nan).
    """

    grid: tuple[int, int]
    anchors: torch.Tensor
    aggregated: torch.Tensor
    threshold: float
    k1: int
    n_per_cell: int


def check_tower(kind: str | None, model: nn.Module) -> None:
    """Refuse a model whose tower of ``kind`` the hooks cannot read (a CLIP tower: no [CLS] row, or
    several feature layers); called when the method is bound, before any image is encoded."""
    if kind == CLIP:
        check_llava_config(model.config)


class NuwaVision:
    """The vision-side stage of a :class:`~.nuwa.Nuwa` bound to a model whose tower it can read."""

    def __init__(self, method: Nuwa, plan_image: Callable[[tuple[int, int]], ImagePlan]) -> None:
        self.method = method
        self.plan_image = plan_image

    def install(
        self, model: nn.Module, report: Callable[[list[EncodedImage]], None]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        windowed = self._install_windowed  # a merger ViT without windows: the same hooks
        installers = {CLIP: self._install_clip, WINDOWED_VIT: windowed, MERGER_VIT: windowed}
        return installers[self.method.vision](model, report)  # type: ignore[index]

    # ---- per tower kind -------------------------------------------------------------------------
    def _install_clip(self, model: nn.Module, report: Callable) -> list:
        llava = by_name(model)
        signals = ClipSignalHooks(llava.model.vision_tower, feature_layer=llava.config.vision_feature_layer)
        projector = llava.model.multi_modal_projector
        pending = threading.local()

        def before_projector(_module, args):
            patches = args[0]  # (images, N, D): hs[vision_feature_layer] without [CLS], as LLaVA projects it
            salience, similarity, _ = signals.take()
            grid = square_grid(patches.shape[1])
            rows = list(salience.view(-1, *grid))
            features, images = self._stage1(list(patches), list(similarity), rows)
            pending.images = images
            return (torch.stack(features),)

        def after_projector(_module, _args, output):
            images, pending.images = pending.images, None
            report([image.reported(output[i]) for i, image in enumerate(images)])

        handles = signals.install()
        handles.append(projector.register_forward_pre_hook(before_projector))
        handles.append(projector.register_forward_hook(after_projector))
        return handles

    def _install_windowed(self, model: nn.Module, report: Callable) -> list:
        visual = by_name(model).model.visual
        signals = QwenSignalHooks(visual)
        official = self.method.official

        def after_tower(_module, args, kwargs, output):
            grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            check_image_grids(grid_thw)
            sig = signals.take(grid_thw, output.pooler_output, official)
            features, images = self._stage1(sig.features, sig.similarity, sig.salience)
            merged = torch.cat(features)
            output.pooler_output = merged
            sizes = [f.shape[0] for f in features]
            report([image.reported(rows) for image, rows in zip(images, merged.split(sizes), strict=True)])
            return output

        handles = signals.install()
        handles.append(visual.register_forward_hook(after_tower, with_kwargs=True))
        return handles

    # ---- stage 1 on a batch of images ------------------------------------------------------
    def _stage1(
        self,
        features: Sequence[torch.Tensor],
        similarity: Sequence[torch.Tensor],
        salience: Sequence[torch.Tensor],
    ) -> tuple[list[torch.Tensor], list[_Image]]:
        """Per image: its features with the aggregated anchors rewritten, and what to report.

        Images are run through :func:`run_stage1` in groups sharing ``n_per_cell`` (it batches each
        grid inside a group); an image whose K₁ covers every token is left as it is.
        """
        grids = [(int(s.shape[0]), int(s.shape[1])) for s in salience]
        plans = [self.plan_image(grid) for grid in grids]
        out = list(features)
        images: list[_Image | None] = [None] * len(grids)
        groups: dict[int, list[int]] = {}
        for i, plan in enumerate(plans):
            if plan.skip:
                n = grids[i][0] * grids[i][1]
                everyone = torch.arange(n, device=features[i].device)
                record = Stage1Record(grids[i], everyone, torch.zeros(n, dtype=torch.bool), math.nan, n, 4)
                images[i] = _Image(record, salience[i].flatten(), plan.counts(n))
            else:
                groups.setdefault(plan.n_per_cell, []).append(i)
        with torch.no_grad():
            for n_per_cell, members in groups.items():
                done = run_stage1(
                    [features[i] for i in members],
                    [similarity[i] for i in members],
                    [salience[i] for i in members],
                    n_per_cell,
                    [plans[i].k1 for i in members],
                    [plans[i].tau for i in members],
                    self.method.settings.gate_quantile,
                    self.method.settings.weighting,
                )
                for i, result in zip(members, done, strict=True):
                    rewritten = features[i].clone()
                    rewritten[result.anchors] = result.features
                    out[i] = rewritten
                    record = Stage1Record(
                        grids[i],
                        result.anchors.cpu(),
                        result.aggregated.cpu(),
                        result.threshold,
                        plans[i].k1,
                        n_per_cell,
                    )
                    counts = plans[i].counts(len(result.anchors))
                    images[i] = _Image(record, salience[i].flatten(), counts)
        return out, images  # type: ignore[return-value]


@dataclass(frozen=True)
class _Image:
    record: Stage1Record
    salience: torch.Tensor
    counts: tuple[int, ...]

    def reported(self, features: torch.Tensor) -> EncodedImage:
        kept = torch.zeros(features.shape[0], dtype=torch.bool)
        kept[self.record.anchors] = True
        return EncodedImage(
            features=features, kept=kept, scores=self.salience.float(), counts=self.counts, record=self.record
        )
