"""Random selection: the control that token-reduction papers compare against.

UniPruneBench (arXiv 2511.02650) and VTC-Bench (arXiv 2510.07143) find random pruning a strong
baseline; a ranking rule is only worth its cost if it beats this one at the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..kinds import ScoreFrom
from .pdrop import PDrop
from .registry import register

if TYPE_CHECKING:
    from ..scoring.base import Scorer


@register
@dataclass(frozen=True)
class Random(PDrop):
    """PDrop's schedule with seeded random scores instead of attention (prune or reroute).

    Each sample and each image draws its own scores from ``seed``, the decision layer and the
    sample's tokens, so one seed gives the same decisions every run and in any batch; two seeds
    give different decisions.
    """

    key: ClassVar[str] = "random"
    display: ClassVar[str] = "Random"
    tabulated: ClassVar[bool] = False  # PDrop's schedule rule: the budget table would repeat its rows

    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Random(seed={self.seed!r}): the seed is an int ≥ 0")
        if self.scorer is not None or self.score_from != ScoreFrom.CURRENT:
            raise ValueError("Random(scorer=..., score_from=...): the random baseline has its own scorer")
        super().__post_init__()

    def make_scorer(self) -> Scorer:
        from ..scoring.random import RandomScores

        return RandomScores(seed=self.seed)
