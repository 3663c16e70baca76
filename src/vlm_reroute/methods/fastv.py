"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): one decision keeps the top-k visual tokens.

FastV + Reroute (arXiv 2606.12412) re-decides at later layers with FastV's count, so a token
deferred at the first decision can come back: ``FastV(layers=[3, 7, 15, 23], keep=k, reroute=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..budget.schedule import Keep, Schedule
from ..budget.target import BudgetTarget
from ..kinds import ScoreFrom
from .base import TokenReduction, check_layer_list
from .registry import register

if TYPE_CHECKING:
    from ..scoring.base import Scorer


@register
@dataclass(frozen=True)
class FastV(TokenReduction):
    """One decision at ``layer`` keeping ``keep`` visual tokens per image (default: layer 3, half).

    ``layers`` (several decision layers, same count at each) with ``reroute=True`` is FastV +
    Reroute; under prune only one decision is allowed (more would be PDrop). Give ``target``
    instead of ``keep`` to solve the count per prompt.
    """

    key: ClassVar[str] = "fastv"
    display: ClassVar[str] = "FastV"
    published_layers: ClassVar[dict[bool, tuple[int, ...]]] = {False: (3,), True: (3, 7, 15, 23)}
    same_count: ClassVar[bool] = True
    prune_decisions: ClassVar[int | None] = 1

    layer: int | None = None
    keep: Keep | None = None
    reroute: bool = False
    score_from: ScoreFrom = ScoreFrom.CURRENT
    scorer: Scorer | None = None
    target: BudgetTarget | None = None
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._check_score_from(self.score_from)
        self._check_target(self.target)
        if self.layer is not None and self.layers is not None:
            raise ValueError(
                f"{owner}(layer={self.layer!r}, layers={self.layers!r}): give one decision layer or the "
                "list of re-decision layers, not both"
            )
        layers = check_layer_list(owner, self.layers)
        if layers is not None and len(layers) > 1 and not self.reroute:
            raise ValueError(
                f"{owner}(layers={list(layers)!r}, reroute=False): FastV prunes once; several decisions "
                "under prune are PDrop (use PDrop(layers=..., keep=...))"
            )
        object.__setattr__(self, "layers", layers)
        if self.target is not None:
            if self.keep is not None:
                raise ValueError(
                    f"{owner}(keep={self.keep!r}, target={self.target!r}): give a keep count or a target, "
                    "not both"
                )
            if self.layer is not None:
                object.__setattr__(self, "layers", check_layer_list(owner, [self.layer]))
                object.__setattr__(self, "layer", None)
            return
        if self.layer is None and self.layers is None:
            object.__setattr__(self, "layer", 3)
        if self.keep is None:
            object.__setattr__(self, "keep", 0.5)
        self.schedule()  # validates

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]:
        """The same count at every decision."""
        return [a] * num_stages

    def schedule(self) -> Schedule | None:
        if self.target is not None:
            return None
        # without a target __post_init__ sets keep, and layer when layers is not given
        assert self.keep is not None
        if self.layers is not None:
            layers: Sequence[int] = self.layers
        else:
            assert self.layer is not None
            layers = (self.layer,)
        return Schedule.of(layers, [self.keep] * len(layers), self.reroute, owner=type(self).__name__)

    def make_scorer(self) -> Scorer:
        from ..scoring.attention import LastTokenAttention

        return self.scorer if self.scorer is not None else LastTokenAttention(score_from=self.score_from)

    @classmethod
    def from_schedule(cls, schedule: Schedule, **settings: Any) -> FastV:
        if len(set(schedule.keep)) != 1:
            raise ValueError(
                f"FastV keeps the same count at every decision; got keep={list(schedule.keep)!r} "
                "(use PDrop for different counts)"
            )
        if len(schedule.layers) == 1:
            return cls(layer=schedule.layers[0], keep=schedule.keep[0], reroute=schedule.reroute, **settings)
        return cls(layers=schedule.layers, keep=schedule.keep[0], reroute=schedule.reroute, **settings)
