"""A method as the executor runs it: decision layers, keep counts per image size, the scorer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..scoring.base import Scorer, Selector
from .vision import VisionStage


@dataclass(frozen=True)
class Plan:
    """A method as the executor runs it: decision layers, per-image keep counts, the scorer.

    ``keep_counts(n)`` gives the count of every stage for an image of ``n`` visual tokens (a fixed
    schedule resolved, or a budget target solved for that size). ``method`` names it in messages.
    With a ``vision`` stage each image's counts come from its report at layer 0, and the decisions
    choose among the tokens it kept. ``scorer`` ranks candidates (the executor keeps the top k) or,
    as a :class:`~vlm_reroute.scoring.base.Selector`, chooses the set itself (DART).
    ``withdraw_at``: from this layer on no visual token runs (VTW's terminal stage).
    """

    method: str
    layers: tuple[int, ...]
    reroute: bool
    keep_counts: Callable[[int], tuple[int, ...]]
    scorer: Scorer | Selector
    vision: VisionStage | None = None
    withdraw_at: int | None = None

    def counts(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per stage: ``(n_images,)`` keep counts for images of ``sizes`` tokens."""
        if self.vision is not None:  # placeholders: the vision stage reports them at layer 0
            return [torch.zeros_like(sizes) for _ in self.layers]
        per_image = [self.keep_counts(int(n)) for n in sizes.tolist()]
        return [
            torch.tensor([c[i] for c in per_image], dtype=torch.long, device=sizes.device)
            for i in range(len(self.layers))
        ]
