"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant and contextual tokens before the LLM.

Stage 1 (``methods.md`` §4; formulas in :mod:`vlm_reroute.scoring.visionzip`): per image, the
``dominant`` most salient tokens, plus ``contextual`` merged tokens — targets at a uniform stride
among the rest, every other token merged into its most key-similar target. Salience and keys come
from the family's adapter (:meth:`~vlm_reroute.adapters.base.ModelAdapter.vision_tap`): the [CLS]
row of the feature-layer block (LLaVA-1.5, the reference's signal) or, for towers without [CLS]
(the Qwen ViTs), the attention each token receives in block −2; a family without a tap is refused
with one error. Settings: ``dominant`` + ``contextual`` (the reference's 54 + 10, 108 + 20, 162 + 30),
or ``k`` tokens in all, split as the reference's tiers (``contextual = round(k · 10/64)``).

Deviations from the reference (``docs/methods.md``, "VisionZip"): kept tokens keep their original
positions and a contextual token sits at its target's position (the reference compacts positions
and appends contextual tokens after the dominant ones); merging averages the rows the language
model receives (after the projector / merger) instead of the tower's hidden states before it; the
[CLS] token itself is not a dominant token (LLaVA-1.5's default feature strategy never feeds it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..budget.rules import round_half_up
from .registry import register
from .stage1 import Stage1Method, kept_mask

if TYPE_CHECKING:
    import torch

    from ..adapters.base import ModelAdapter
    from ..adapters.vision import TowerSignals

DOMINANT, CONTEXTUAL = 54, 10  # the reference's 64-token setting (LLaVA-1.5)


def split(k: int) -> tuple[int, int]:
    """``k`` tokens as the reference's tiers split them: ``contextual = round(k · 10/64)``."""
    contextual = round_half_up(k * CONTEXTUAL / (DOMINANT + CONTEXTUAL))
    return k - contextual, contextual


@dataclass(frozen=True)
class VisionZipRecord:
    """``trace.stage1[sample][image]``: ``dominant`` and contextual ``targets`` (long, ascending, indices
    among the image's tokens), ``assigned`` (target index of each merged token), the image's ``views``
    (rows × cols of each view in token order: one for LLaVA-1.5 and the Qwen towers; LLaVA-NeXT's base
    view then its crop grid) and ``newlines``: its tokens that are no view cell, never picked nor merged
    (they enter only when K₁ exceeds the cells)."""

    dominant: torch.Tensor
    targets: torch.Tensor
    assigned: torch.Tensor
    views: tuple[tuple[int, int], ...]
    newlines: torch.Tensor

    @property
    def grid(self) -> tuple[int, int]:
        """The first view's rows × cols (the whole image for a single-view family)."""
        return self.views[0]

    @property
    def anchors(self) -> torch.Tensor:
        """The kept tokens, ascending (newlines that entered included)."""
        kept = [*self.dominant.tolist(), *self.targets.tolist(), *self.newlines.tolist()]
        return self.dominant.new_tensor(sorted(kept))


@register
@dataclass(frozen=True)
class VisionZip(Stage1Method):
    """VisionZip's stage 1: ``dominant`` + ``contextual`` tokens per image (default 54 + 10), or ``k``
    in all (int, or a fraction of the image), then the in-decoder part (:class:`~.stage1.Stage1Method`)."""

    key: ClassVar[str] = "visionzip"
    display: ClassVar[str] = "VisionZip"

    dominant: int | None = None
    contextual: int | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{owner}({name}={value!r}): a token count ≥ 0")
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError(
                f"{owner}(dominant={self.dominant!r}, contextual={self.contextual!r}): give both"
            )
        if self.dominant is not None and self.contextual is not None:  # both or neither (checked above)
            if self.k is not None or self.target is not None:
                raise ValueError(f"{owner}: give dominant= with contextual=, or k=, or target=; not several")
            if self.dominant + self.contextual == 0:
                raise ValueError(f"{owner}(dominant=0, contextual=0): at least one token must enter")
        self._check_common()

    def entry_setting(self) -> float | int:
        if self.dominant is not None and self.contextual is not None:  # both or neither (__post_init__)
            return self.dominant + self.contextual
        return DOMINANT + CONTEXTUAL if self.k is None else self.k

    def counts_of(self, k1: int) -> tuple[int, int]:
        """``(dominant, contextual)`` for ``k1`` entering tokens."""
        dominant, contextual = self.dominant, self.contextual
        if dominant is not None and contextual is not None and k1 == dominant + contextual:
            return dominant, contextual
        return split(k1)

    def stage(self, adapter: ModelAdapter, plan: Callable[[int], tuple[int, tuple[int, ...]]]) -> Any:
        from ..adapters.vision import require_tap

        return VisionZipStage(self, require_tap(adapter, "VisionZip"), plan)


class VisionZipStage:
    """Hooks the family's tap; rewrites each encoding's rows and reports every image."""

    def __init__(
        self, method: VisionZip, tap: Any, plan: Callable[[int], tuple[int, tuple[int, ...]]]
    ) -> None:
        self.method, self.tap, self.plan = method, tap, plan

    def install(self, model: Any, report: Callable) -> list:
        from ..engine.vision import EncodedImage

        def rewrite(signals: TowerSignals) -> list[torch.Tensor]:
            rows, images = [], []
            for i, features in enumerate(signals.features):  # a loop over images
                k1, counts = self.plan(features.shape[0])
                new, record = self.image(signals, i, k1)
                salience = signals.salience[i].float().cpu()
                rows.append(new)
                images.append(
                    EncodedImage(new, kept_mask(len(new), record.anchors), salience, counts, record)
                )
            report(images)
            return rows

        return self.tap.install(rewrite)

    def image(self, signals: TowerSignals, i: int, k1: int) -> tuple[torch.Tensor, VisionZipRecord]:
        """Image ``i``'s rewritten rows and record for ``k1`` entering tokens: VisionZip among its view
        cells; its non-cell tokens (newlines) enter only to fill a K₁ above the cells, first ones first."""
        import torch

        from ..scoring.visionzip import visionzip_select

        features, views = signals.features[i], signals.views[i]
        n = features.shape[0]
        cells = torch.ones(n, dtype=torch.bool)
        cells[signals.extras_of(i).cpu()] = False
        newlines = (~cells).nonzero().flatten()
        if k1 >= n:
            everyone = torch.arange(n)
            return features, VisionZipRecord(everyone[cells], everyone[:0], everyone[:0], views, newlines)
        at = cells.nonzero().flatten().to(features.device)
        take = min(k1, at.numel())
        dominant, contextual = self.method.counts_of(take)
        with torch.no_grad():
            done = visionzip_select(
                features[at], signals.salience[i][at], signals.keys[i][at], dominant, contextual
            )
        new = features.clone()
        new[at] = done.features
        back = at.cpu()
        record = VisionZipRecord(
            back[done.dominant.cpu()],
            back[done.targets.cpu()],
            done.assigned.cpu(),
            views,
            newlines[: k1 - take],
        )
        return new, record
