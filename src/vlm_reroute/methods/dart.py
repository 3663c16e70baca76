"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): keep the visual tokens that duplicate no pivot.

At a decision the tokens with the largest key L1 norm become pivots (4 image + 4 text by default,
the paper's Table 8 setting); each pivot retains the candidates least cosine-similar to it (on the
model's final norm of the hidden states), with exact per-pivot quotas so that every image keeps
exactly its count (``scoring/dart.py``; ``methods.md`` §3.2). Published: one prune before layer 2
of 32 (``--pruned_layer 2``). DART + Reroute re-selects at the FastV + Reroute-style layers [2, 7,
15, 23] with the same count, among active ∪ deferred tokens (deferred ones with their carried states).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..budget.schedule import Keep, Schedule
from ..budget.target import BudgetTarget
from ..kinds import ScoreFrom
from .base import LayerKeepMethod, check_layer_list, keep_tuple
from .registry import register

if TYPE_CHECKING:
    from ..scoring.base import Selector

#: the README's example, ``--reduction_ratio 0.778``: 22.2 % of each image's tokens kept
DEFAULT_KEEP = 0.222
FEATURES = ("final_norm", "layer_norm", "hidden")


@register
@dataclass(frozen=True)
class DART(LayerKeepMethod):
    """Decisions at ``layers`` (default: [2] of 32 for prune, [2, 7, 15, 23] for reroute, scaled to
    the depth), each keeping ``keep`` tokens per image (one entry for every decision, or one per
    decision), or the counts solved per prompt from ``target``.

    ``image_pivots`` (≥ 1) and ``text_pivots`` (≥ 0): pivots per image, chosen by key L1 norm among
    the candidates and among the text after the image. ``features``: the states the cosines compare
    (``"final_norm"`` the reference's; ``"layer_norm"``, ``"hidden"``). A stage whose count is
    below ``image_pivots`` (a small solved count) keeps its top-count pivots only.
    """

    key: ClassVar[str] = "dart"
    display: ClassVar[str] = "DART"
    published_layers: ClassVar[dict[bool, tuple[int, ...]]] = {False: (2,), True: (2, 7, 15, 23)}
    same_count: ClassVar[bool] = True
    prune_decisions: ClassVar[int | None] = 1

    layers: Sequence[int] | None = None
    keep: Keep | Sequence[Keep] | None = None
    reroute: bool = False
    target: BudgetTarget | None = None
    image_pivots: int = 4
    text_pivots: int = 4
    features: str = "final_norm"
    score_from: ScoreFrom = ScoreFrom.CURRENT

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._check_score_from(self.score_from)
        self._check_target(self.target)
        for name, low in (("image_pivots", 1), ("text_pivots", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{owner}({name}={value!r}): allowed is an int ≥ {low}")
        if self.features not in FEATURES:
            raise ValueError(f"{owner}(features={self.features!r}): allowed are {', '.join(FEATURES)}")
        object.__setattr__(self, "layers", check_layer_list(owner, self.layers))
        Schedule.of([1], [1], self.reroute, owner=owner)  # checks the reroute flag
        if self.target is not None:
            if self.keep is not None:
                raise ValueError(
                    f"{owner}(keep={self.keep!r}, target={self.target!r}): give keep counts or a target, "
                    "not both"
                )
            return
        keep = keep_tuple(DEFAULT_KEEP if self.keep is None else self.keep)
        if self.layers is None and len(keep) != 1:
            raise ValueError(
                f"{owner}(keep={list(keep)!r}) without layers: give one keep entry for the default "
                "decision layers, or layers= with one entry per layer"
            )
        object.__setattr__(self, "keep", keep)
        counts = [k for k in keep if isinstance(k, int)]
        if counts and min(counts) < self.image_pivots:
            raise ValueError(
                f"{owner}(image_pivots={self.image_pivots}, keep={list(keep)!r}): every stage keeps its "
                f"image pivots; allowed are keep counts ≥ {self.image_pivots} (or fewer image_pivots)"
            )
        self.schedule()  # validates explicit layers with their counts

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]:
        """The same count at every decision (the published single prune; reroute re-selects it)."""
        return [a] * num_stages

    @classmethod
    def from_schedule(cls, schedule: Schedule, **settings: Any) -> DART:
        """DART running ``schedule``. A solved schedule keeps one count at every decision, and on a
        small image that count can fall below ``image_pivots`` (which an explicit ``keep`` may not):
        a target-solved DART then keeps the top-count pivots at every stage, and so does this method
        with ``image_pivots`` lowered to that count (no picks are left for any pivot either way), so
        ``vlm-reroute explain --compare`` and the solver's ``to_method()`` run what the target ran."""
        counts = set(schedule.keep)
        pivots = settings.get("image_pivots", cls.image_pivots)
        if len(counts) == 1 and all(isinstance(k, int) and 1 <= k < pivots for k in counts):
            settings = {**settings, "image_pivots": schedule.keep[0]}
        return cls(layers=schedule.layers, keep=schedule.keep, reroute=schedule.reroute, **settings)

    def stage_keep(self, layers: Sequence[int]) -> tuple[Keep, ...]:
        """One keep entry repeated for every decision of ``layers``, or one entry per decision."""
        assert self.keep is not None  # set by __post_init__ without a target (the only callers' case)
        keep = keep_tuple(self.keep)
        return keep * len(layers) if len(keep) == 1 else keep

    def make_scorer(self) -> Selector:
        from ..scoring.dart import DartFeatures, DartSelector

        # features was checked against FEATURES (DartFeatures' values) in __post_init__
        features = DartFeatures(self.features)
        return DartSelector(self.image_pivots, self.text_pivots, features, self.score_from)
