"""DivPrune (Alvar, Singh, Akbari, Zhang, CVPR 2025, arXiv 2503.02175): a diverse subset of the image.

Stage 1 (``methods.md`` §4): of each image's projected visual embeddings — the rows the language
model receives — keep the ``k`` that solve the Max-Min Diversity Problem greedily on ``1 − cos``
(:func:`~vlm_reroute.scoring.divprune.divprune_select`); default ``k = 0.098`` of the image (the
reference's retained ratio: 56 of LLaVA-1.5's 576). It needs nothing from the vision tower, so it
decides at the input of decoder layer 0 and runs on every family (multi-view layouts included: all
of an image's views and newline tokens form one candidate set).

Deviation from the reference: kept tokens keep their original positions (the reference compacts
them); see ``docs/methods.md`` ("DivPrune", "Stage 1 composition").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .registry import register
from .stage1 import Stage1Method, kept_mask, side_of

if TYPE_CHECKING:
    import torch

    from ..adapters.base import ModelAdapter

DEFAULT_RATIO = 0.098  # the reference's retained ratio (README: "default retained ratio is set to 0.098")


@dataclass(frozen=True)
class DivPruneRecord:
    """``trace.stage1[sample][image]``: ``picks`` (long) in greedy order, ``grid`` (a guess: square, or
    one row), ``k`` tokens asked for."""

    picks: torch.Tensor
    grid: tuple[int, int]
    k: int

    @property
    def anchors(self) -> torch.Tensor:
        """The kept tokens, ascending (the name Nüwa's record uses, for pictures)."""
        return self.picks.sort().values


@register
@dataclass(frozen=True)
class DivPrune(Stage1Method):
    """DivPrune's stage 1: ``k`` tokens per image (int, or a fraction; default 0.098), then the
    in-decoder part (see :class:`~.stage1.Stage1Method`: ``then``, ``layers``/``keep``, ``target``)."""

    key: ClassVar[str] = "divprune"
    display: ClassVar[str] = "DivPrune"

    def __post_init__(self) -> None:
        self._check_common()

    def entry_setting(self) -> float | int:
        return DEFAULT_RATIO if self.k is None else self.k

    def stage(self, adapter: ModelAdapter, plan: Callable[[int], tuple[int, tuple[int, ...]]]) -> Any:
        return DivPruneStage(plan)


class DivPruneStage:
    """A stage deciding at layer 0 from each image's rows (no hooks)."""

    def __init__(self, plan: Callable[[int], tuple[int, tuple[int, ...]]]) -> None:
        self.plan = plan

    def install(self, model: Any, report: Any) -> list:
        return []

    def decide(self, rows: list[torch.Tensor]) -> list:
        import torch

        from ..engine.vision import EncodedImage
        from ..scoring.divprune import divprune_select

        out = []
        for image in rows:  # a loop over images
            n = image.shape[0]
            k1, counts = self.plan(n)
            with torch.no_grad():
                picks = torch.arange(n) if k1 >= n else divprune_select(image, k1).cpu()
            scores = torch.zeros(n)
            scores[picks] = torch.arange(k1, 0, -1, dtype=torch.float32) / k1  # first pick scores 1
            record = DivPruneRecord(picks, side_of(n), k1)
            out.append(EncodedImage(image, kept_mask(n, picks), scores, counts, record))
        return out
