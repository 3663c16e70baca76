"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): several decisions, fewer tokens per stage.

With ``reroute=True`` every visual token competes again at each decision (Reroute, arXiv
2606.12412) instead of being removed for good; per-layer counts, FLOPs and KV bytes stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..budget.schedule import Keep, Schedule
from ..budget.target import BudgetTarget
from ..kinds import ScoreFrom
from .base import LayerKeepMethod
from .registry import register

if TYPE_CHECKING:
    from ..scoring.base import Scorer

_ORIGINAL_LAYERS = (8, 16, 24)
_ORIGINAL_KEEP = (0.5, 0.25, 0.125)


@register
@dataclass(frozen=True)
class PDrop(LayerKeepMethod):
    """Decisions at ``layers``, stage ``i`` keeping ``keep[i]`` visual tokens per image.

    Defaults: the original PyramidDrop on LLaVA-1.5 (decisions at 8, 16, 24, halving). Give
    ``target`` instead of ``keep`` to solve the counts per prompt (decision layers: ``layers``,
    else the Reroute paper's [2, 7, 15, 23] scaled to the model's depth). ``scorer`` replaces the
    default last-token attention (e.g. ``LastTokenAttention(rows=3, heads="max")``).
    """

    key: ClassVar[str] = "pdrop"
    display: ClassVar[str] = "PDrop"
    published_layers: ClassVar[dict[bool, tuple[int, ...]]] = {False: (2, 7, 15, 23), True: (2, 7, 15, 23)}

    layers: Sequence[int] | None = None
    keep: Sequence[Keep] | None = None
    reroute: bool = False
    score_from: ScoreFrom = ScoreFrom.CURRENT
    scorer: Scorer | None = None
    target: BudgetTarget | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._check_score_from(self.score_from)
        self._check_target(self.target)
        if self._solved_per_prompt(owner):
            return
        if (self.layers is None) != (self.keep is None):
            raise ValueError(
                f"{owner}(layers={self.layers!r}, keep={self.keep!r}): give both or neither "
                "(neither: the original PyramidDrop schedule)"
            )
        layers = _ORIGINAL_LAYERS if self.layers is None else self.layers
        keep = _ORIGINAL_KEEP if self.keep is None else self.keep
        schedule = Schedule.of(layers, keep, self.reroute, owner=owner)
        object.__setattr__(self, "layers", schedule.layers)
        object.__setattr__(self, "keep", schedule.keep)

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]:
        """Prune: constant retention ``ρ = a/n`` per decision (the rule behind the published PDrop
        192 / 128 tiers); reroute: ``[a, a, a/2, a/4, ...]`` (the Reroute paper's PDrop + Reroute)."""
        if not reroute:
            return [a * (a / n_visual) ** i for i in range(num_stages)]
        return [a if i < 2 else a / 2 ** (i - 1) for i in range(num_stages)]

    def make_scorer(self) -> Scorer:
        from ..scoring.attention import LastTokenAttention

        return self.scorer if self.scorer is not None else LastTokenAttention(score_from=self.score_from)

    @classmethod
    def from_schedule(cls, schedule: Schedule, **settings: Any) -> PDrop:
        return cls(layers=schedule.layers, keep=schedule.keep, reroute=schedule.reroute, **settings)
