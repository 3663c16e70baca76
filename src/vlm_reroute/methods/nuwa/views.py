"""Nüwa stage 1 on the multi-view families: one anchor rule per view grid, K₁ split over the views.

Nüwa (arXiv 2602.02951) defines stage 1 on one token grid (``nuwa.md`` §1, §3). An image of LLaVA-NeXT
or LLaVA-OneVision is a base view and a grid of local crops with one newline token per row; an image of
InternVL, Idefics3 or SmolVLM is several tiles and a thumbnail / global view. The family's vision tap
(``adapters/vision_views.py``, ``adapters/vision_prompt.py``) hands every image's views in the order
the language model receives them; here each view is one grid, and the image's K₁ is split over them:

- **anyres** (LLaVA-NeXT, OneVision; ``nuwa.md`` §4, the release's ``CLIPVisionTower_Nuwa_Next``): the
  base view is pruned on its own grid with ``K₁ // crops`` (``crops`` = the views the tower encoded,
  base included); the local crops, stitched and un-padded by the family's own packing, are pruned
  jointly on that one grid with the rest, ``K₁ − K₁ // crops`` (the release: ``K₁ // crops`` per
  local crop, which drops ``K₁ mod crops`` tokens; here they go to the stitched grid so an image keeps
  exactly K₁, the library's per-image budget). A view's cell quota starts at the setting's ``n`` and
  rises (at most 4) until its cells propose its share (§4's auto-escalation).
- **tiles** (InternVL, Idefics3, SmolVLM; this library's extension, no published rule): every view on
  its own grid, K₁ split in proportion to the views' token counts (largest remainders, ties to the
  earlier view). The tiles are separate grids in the prompt (separator text between them), so neither
  the 2×2 cells nor the aggregation kernel cross a tile's edge.

Newline tokens (``TowerSignals.extras``) are never anchors and never absorbed (one learned vector, no
image content); they enter only when K₁ exceeds the image's cells, first ones first, as for VisionZip.
The release appends one newline per un-padded row after pruning; here every kept token keeps its
original position (the row is in the position ids), and K₁ stays the image's entering count.

Signals per view: the tap's salience (LLaVA-NeXT, InternVL: the [CLS] row; OneVision, Idefics3,
SmolVLM: the attention received in block −2) and similarity features (the mean of the release's late
block outputs, ``SimilarityReader``), mapped to tokens as the family maps its features. Aggregation
mixes the rows the language model receives (after the projector / pixel shuffle), as the Qwen release
does after its merger; high anchors keep their rows bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...budget.stage1 import CLIP
from ...engine.vision import EncodedImage
from .aggregate import qwen_tau, run_stage1
from .signals import clip_similarity_layers, qwen_similarity_blocks
from .vision import Stage1Record

if TYPE_CHECKING:
    from ...adapters.base import ModelAdapter
    from ...adapters.vision_views import ViewSignals
    from .method import ImagePlan, Nuwa


def multi_view_tap(adapter: ModelAdapter) -> Any:
    """The adapter's tap when its images are several views (``AnyresTap``, ``PromptTap``), else None."""
    from ...adapters.vision_prompt import PromptTap
    from ...adapters.vision_views import AnyresTap

    tap = adapter.vision_tap()
    return tap if isinstance(tap, AnyresTap | PromptTap) else None


def split_anyres(k1: int, sizes: Sequence[int], crops: int) -> list[int]:
    """``nuwa.md`` §4: the base view (``sizes[0]``) gets ``K₁ // crops``, the stitched crop grid the rest
    (``K₁`` for an image without crops); each share at most its view's cells (the excess to the other)."""
    if len(sizes) == 1:
        return [min(k1, sizes[0])]
    base = min(k1 // max(crops, 1), sizes[0])
    rest = min(k1 - base, sizes[1])
    return [min(k1 - rest, sizes[0]), rest]


def split_proportional(k1: int, sizes: Sequence[int]) -> list[int]:
    """K₁ over views in proportion to their cells: ``⌊K₁·n_v/N⌋``, then one more to the largest
    remainders (ties: the earlier view). Exact integers; the shares sum to ``min(K₁, N)``."""
    total = sum(sizes)
    k = min(k1, total)
    shares = [k * n // total for n in sizes]
    order = sorted(range(len(sizes)), key=lambda v: (-(k * sizes[v] % total), v))
    for v in order[: k - sum(shares)]:
        shares[v] += 1
    return shares


def real_candidates(height: int, width: int, n_per_cell: int) -> int:
    """Candidates the 2×2 cells of a ``height × width`` grid propose on real tokens (padding ranks last
    in a cell, ``select.select_anchors``): ``Σ_cells min(n, real tokens of the cell)``."""
    n = min(n_per_cell, 4)
    count = (height // 2) * (width // 2) * n
    count += (height % 2) * (width // 2) * min(n, 2) + (width % 2) * (height // 2) * min(n, 2)
    return count + (height % 2) * (width % 2) * min(n, 1)


def view_quota(height: int, width: int, share: int, start: int) -> int:
    """The smallest quota ≥ ``start`` (0: 1) whose real candidates cover ``share`` (§4: up to 4)."""
    n = max(start, 1)
    while n < 4 and real_candidates(height, width, n) < share:
        n += 1
    return n


@dataclass(frozen=True)
class ViewsRecord:
    """``trace.stage1[sample][image]`` for a multi-view image: its ``views`` (rows × cols in token
    order), each view's :class:`~.vision.Stage1Record` in ``per_view`` (None: the view entered whole or
    not at all), ``shares`` (K₁ per view), the ``anchors`` among the image's tokens (ascending, newlines
    that entered included), its ``newlines`` and ``k1``."""

    views: tuple[tuple[int, int], ...]
    per_view: tuple[Stage1Record | None, ...]
    shares: tuple[int, ...]
    anchors: torch.Tensor
    newlines: torch.Tensor
    k1: int

    @property
    def grid(self) -> tuple[int, int]:
        """The first view's rows × cols."""
        return self.views[0]


class NuwaViews:
    """The vision-side stage of a :class:`~.method.Nuwa` on a multi-view family (module docstring)."""

    def __init__(self, method: Nuwa, tap: Any, plan: Callable[[int], ImagePlan]) -> None:
        from ...adapters.vision_views import AnyresTap

        self.method, self.tap, self.plan = method, tap, plan
        self.anyres = isinstance(tap, AnyresTap)
        if method.vision == CLIP:  # hs[k] is block k's output: hs[16..24] of 24 are blocks 15..23
            tap.read_similarity(lambda depth: [i - 1 for i in clip_similarity_layers(depth)])
        else:
            tap.read_similarity(lambda depth: list(qwen_similarity_blocks(depth)))

    def install(self, model: Any, report: Callable[[list[EncodedImage]], None]) -> list:
        def rewrite(signals: ViewSignals) -> list[torch.Tensor]:
            rows, images = [], []
            for i in range(len(signals.features)):  # a loop over images
                new, image = self.image(signals, i)
                rows.append(new)
                images.append(image)
            report(images)
            return rows

        return self.tap.install(rewrite)

    def image(self, signals: ViewSignals, i: int) -> tuple[torch.Tensor, EncodedImage]:
        """Image ``i``'s rows (aggregated anchors rewritten) and its report."""
        features, views = signals.features[i], signals.views[i]
        n = features.shape[0]
        plan = self.plan(n)
        cells = torch.ones(n, dtype=torch.bool)
        cells[signals.extras_of(i).cpu()] = False
        at = cells.nonzero().flatten()
        newlines = (~cells).nonzero().flatten()
        sizes = [h * w for h, w in views]
        if sum(sizes) != at.numel():
            raise ValueError(f"views {views} hold {sum(sizes)} cells but image {i} has {at.numel()}")
        crops = (signals.crops or [len(views)] * (i + 1))[i]
        k = min(plan.k1, at.numel())
        shares = split_anyres(k, sizes, crops) if self.anyres else split_proportional(k, sizes)
        if plan.skip:
            shares = list(sizes)
        new, kept = features, []
        per_view: list[Stage1Record | None] = []
        with torch.no_grad():
            for view, (start, share) in enumerate(zip(_starts(sizes), shares, strict=True)):
                index = at[start : start + sizes[view]]
                if share in (0, sizes[view]):  # the view enters whole (or not at all), unchanged
                    per_view.append(None)
                    kept.append(index[:share])
                    continue
                view_record, rows = self._view(signals, i, index, views[view], share, plan)
                per_view.append(view_record)
                if new is features:
                    new = features.clone()
                new[index.to(features.device)[view_record.anchors.to(features.device)]] = rows
                kept.append(index[view_record.anchors])
        entered = newlines[: max(0, plan.k1 - at.numel())] if not plan.skip else newlines
        anchors = torch.cat([*kept, entered]).sort().values
        record = ViewsRecord(tuple(views), tuple(per_view), tuple(shares), anchors, newlines, plan.k1)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[anchors] = True
        salience = signals.salience[i].float().cpu()
        return new, EncodedImage(new, mask, salience, plan.counts(int(anchors.numel())), record)

    def _view(
        self,
        signals: ViewSignals,
        i: int,
        index: torch.Tensor,
        grid: tuple[int, int],
        share: int,
        plan: ImagePlan,
    ) -> tuple[Stage1Record, torch.Tensor]:
        """Stage 1 of one view (its tokens at ``index`` of image ``i``) with ``share`` anchors."""
        if signals.similarity is None:
            raise RuntimeError("the tap gave no similarity features (read_similarity was not called)")
        height, width = grid
        device = signals.features[i].device
        at = index.to(device)
        settings = self.method.settings
        quota = view_quota(height, width, share, plan.n_per_cell)
        tau = qwen_tau(height, width) if math.isnan(plan.tau) else plan.tau
        salience = signals.salience[i].to(device)[at].float().view(height, width)
        result = run_stage1(
            [signals.features[i][at]],
            [signals.similarity[i].to(device)[at]],
            [salience],
            quota,
            share,
            tau,
            settings.gate_quantile,
            settings.weighting,
        )[0]
        anchors = result.anchors.cpu()
        record = Stage1Record(grid, anchors, result.aggregated.cpu(), result.threshold, share, quota)
        return record, result.features


def _starts(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
