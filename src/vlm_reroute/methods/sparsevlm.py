"""SparseVLM (arXiv 2410.04417, ICML 2025) and SparseVLM+ (``variant="v2.0"``, same release).

Text raters chosen once per prompt from the language model's input embeddings rate the visual
tokens at three decisions; the top k per image go on (``methods.md`` §3.1). The release prunes the
*output* of layers 2, 6 and 15, which is a decision at layers 3, 7 and 16 scored by the layer
before (``score_from="previous"``, ``methods.md`` §2 "Library mapping"). With ``reroute=True``
every visual token competes again at each decision with the same rater rows (Reroute, arXiv
2606.12412).

Deviations from the release, all deliberate (``docs/methods.md`` "SparseVLM"): original position
ids are kept (the release renumbers them in v1.5); recycling (DPC-kNN merging of pruned tokens,
v1.5) is not built (``recycling="off"``, as in v2.0); the rank-based v1 counts are not built;
scores are computed from the rater rows only (linear memory), not from the full attention matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..budget.published import SPARSEVLM_KEEP, SPARSEVLM_LAYERS
from ..budget.schedule import Keep, Schedule
from ..budget.target import BudgetTarget
from ..kinds import ScoreFrom
from .base import LayerKeepMethod
from .registry import register

if TYPE_CHECKING:
    from ..scoring.base import Scorer

VARIANTS = tuple(SPARSEVLM_KEEP)
RECYCLING = ("off",)
#: the keep rule's proportions: the published v1.5 "64" counts [66, 30, 17] relative to the first
_SHAPE = (1.0, 30 / 66, 17 / 66)
#: SparseVLM+ keeps 14 of LLaMA-7B's 32 heads ("priority heads"); other models keep this fraction
PRIORITY_HEADS = 14 / 32


@register
@dataclass(frozen=True)
class SparseVLM(LayerKeepMethod):
    """Decisions at ``layers`` (default ``[3, 7, 16]`` scaled to the depth), stage ``i`` keeping
    ``keep[i]`` per image.

    ``variant``: ``"v1.5"`` (head mean) or ``"v2.0"`` (SparseVLM+: gravity correction and priority
    heads). Defaults: the release's default tier (``RETAIN_TOKN=192``) of the variant as fractions
    of 576. Give ``target`` instead of ``keep`` to solve the counts per prompt with SparseVLM's rule.
    ``recycling`` is ``"off"`` (the only setting built).
    """

    key: ClassVar[str] = "sparsevlm"
    display: ClassVar[str] = "SparseVLM"
    published_layers: ClassVar[dict[bool, tuple[int, ...]]] = {
        False: SPARSEVLM_LAYERS,
        True: SPARSEVLM_LAYERS,
    }

    layers: Sequence[int] | None = None
    keep: Sequence[Keep] | None = None
    reroute: bool = False
    variant: str = "v1.5"
    score_from: ScoreFrom = ScoreFrom.PREVIOUS
    target: BudgetTarget | None = None
    recycling: str = "off"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.variant not in VARIANTS:
            raise ValueError(
                f"{owner}(variant={self.variant!r}): allowed are 'v1.5' (SparseVLM) and 'v2.0' (SparseVLM+)"
            )
        if self.recycling not in RECYCLING:
            raise ValueError(
                f"{owner}(recycling={self.recycling!r}): only 'off' is built (v2.0 runs without it; "
                "v1.5's token recycling is not implemented)"
            )
        self._check_score_from(self.score_from)
        self._check_target(self.target)
        if self._solved_per_prompt(owner):
            return
        if self.layers is not None and self.keep is None:
            raise ValueError(
                f"{owner}(layers={list(self.layers)!r}, keep=None): give keep counts for these layers, "
                "or a target to solve them from"
            )
        keep = self.keep
        if keep is None:
            keep = tuple(c / 576 for c in SPARSEVLM_KEEP[self.variant][192])
        # without layers: the release's layers scaled to the depth once it is known (``keep_counts``),
        # checked here at 32 layers, where they are the release's own
        layers = SPARSEVLM_LAYERS if self.layers is None else self.layers
        schedule = Schedule.of(layers, keep, self.reroute, owner=owner)
        object.__setattr__(self, "layers", None if self.layers is None else schedule.layers)
        object.__setattr__(self, "keep", schedule.keep)

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]:
        """The published "64" tier's shape: ``[a, a·30/66, a·17/66]``, then ``×17/30`` per further
        decision (prune and reroute alike, so the twins keep the same counts)."""
        shape = list(_SHAPE)
        while len(shape) < num_stages:
            shape.append(shape[-1] * _SHAPE[2] / _SHAPE[1])
        return [a * f for f in shape[:num_stages]]

    def make_scorer(self) -> Scorer:
        from ..scoring.query_rows import QueryRowAttention

        if self.variant == "v2.0":
            return QueryRowAttention(priority_heads=PRIORITY_HEADS, gravity=True, score_from=self.score_from)
        return QueryRowAttention(score_from=self.score_from)
