"""Nüwa (Huang et al., ICLR 2026, arXiv 2602.02951): spatial anchors before the language model, one
attention-ranked cut inside it. ``nuwa.md`` is the spec; ``docs/nuwa.md`` the user's page.

Stage 1 runs while the images are encoded (``vision.py``): each 2×2 cell of an image's grid
proposes its ``n_per_cell`` most salient tokens, the K₁ most salient candidates become anchors (in
raster order) and the anchors below a salience gate absorb similar, nearby tokens. Only the anchors
enter the language model, each at its original position. Stage 2 keeps the K₂ anchors that the last
prompt token(s) attend to most; its decision applies from ``stage2_layer`` on and is scored with the
attention of the layer before (LLaVA-1.5: from layer 16 of 32, last token, head mean; Qwen2.5-VL:
from layer 15 of 28, the last three query rows, head max).

With ``reroute=True`` (Reroute, arXiv 2606.12412) stage 1 is unchanged and stage 2 routes among the
anchors: a decision at the stage-2 layer and re-decisions spread evenly over the remaining depth
(default four decisions), each keeping K₂, so per-layer counts, avg_T and KV bytes equal Nüwa's.

Settings as released (``nuwa.md`` §5): ``Nuwa(budget=64 | 128 | 192)`` on LLaVA-1.5 is
K₁ / K₂ / n = 112 / 16 / 1, 224 / 32 / 2, 336 / 48 / 3; ``Nuwa(ratio=0.25 | 0.5 | 0.75)`` on
Qwen2.5-VL is s₁ / s₂ / n = 0.35 / 0.42 / 3, 0.60 / 0.66 / 3, 0.85 / 0.70 / 4 (K₁ = min(⌈N·s₁⌉, |C|),
K₂ = max(1, int(anchors · s₂))). ``official=True`` reproduces the release where it differs from the
spec's fixes (``docs/nuwa.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ...budget.rules import round_half_up
from ...budget.schedule import Keep, Schedule, check_keep_value
from ...budget.target import BudgetTarget
from ..base import TokenReduction, scale_layers
from ..registry import register
from ..stage1 import Composable, check_then
from .release import (
    BY_SETTING,
    DEFAULT,
    LLAVA_BUDGETS,
    QWEN_RATIOS,
    RELEASES,
    FamilySettings,
    Release,
    check_release_setting,
    release_for,
)

if TYPE_CHECKING:
    from ...adapters.base import ModelAdapter
    from ...engine.vision import VisionStage
    from ...scoring.base import Scorer, Selector

__all__ = ["LLAVA_BUDGETS", "QWEN_RATIOS", "FamilySettings", "ImagePlan", "Nuwa", "spread"]

REROUTE_DECISIONS = 4  # default stage-2 decisions under reroute (as many as FastV / PDrop + Reroute)
K2_PER_K1 = 1 / 7  # the LLaVA release's K₂ = K₁ / 7, the solver's rule


@dataclass(frozen=True)
class ImagePlan:
    """Stage 1 of one image: ``k1`` anchors from ``n_per_cell`` candidates per cell, kernel radius
    ``tau``, and each later decision's ``keep`` (an int count, or a fraction of the anchors).
    ``skip``: K₁ covers every token, so stage 1 leaves the image as it is."""

    k1: int
    n_per_cell: int
    tau: float
    keep: tuple[Keep, ...]
    skip: bool = False
    then: Any = None  # the composed in-decoder method's counts, as a function of the anchors

    def counts(self, anchors: int) -> tuple[int, ...]:
        """Keep count of each decision for an image that kept ``anchors`` anchors."""
        if self.then is not None:
            return tuple(self.then(anchors))
        return tuple(min(anchors, k) if isinstance(k, int) else max(1, int(anchors * k)) for k in self.keep)


def spread(first: int, num_layers: int, decisions: int) -> tuple[int, ...]:
    """``decisions`` layers from ``first`` spread evenly over the rest of the depth: ``first +
    round(i · (L − first) / decisions)`` (32 layers from 16: 16, 20, 24, 28)."""
    span = num_layers - first
    return tuple(sorted({first + round_half_up(i * span / decisions) for i in range(decisions)}))


@register
@dataclass(frozen=True)
class Nuwa(Composable, TokenReduction):
    """Nüwa on LLaVA-1.5 and the Qwen towers, and per view on the multi-view families (``views.py``);
    prune, or with ``reroute=True`` routing among the anchors.

    Give one of: ``budget`` (LLaVA-1.5 release: 64, 128, 192), ``ratio`` (Qwen2.5-VL release: 0.25,
    0.5, 0.75), ``k1`` and ``k2`` (anchors per image: an int, or a fraction ``f`` of the image's
    tokens taken as ``min(⌈N·f⌉, |C|)``; tokens after stage 2: an int, or a fraction of the anchors),
    or ``target`` (a :class:`~vlm_reroute.BudgetTarget` solved per image size with K₂ = K₁/7); none:
    the family's headline setting (budget 64, ratio 0.25). An image whose K₁ covers all its tokens
    skips stage 1, so ``Nuwa(k1=1.0, k2=1.0)`` is the untouched model.

    ``stage2_layer``: the first layer after the stage-2 cut (default: the release's, scaled to the
    depth); ``layers``: every stage-2 decision layer instead (reroute: default ``decisions`` = 4
    spread evenly from the stage-2 layer). ``n_per_cell`` (default: the preset's, else the fewest that
    give K₁ candidates), ``gate_quantile`` and ``tau`` (kernel radius in grid cells) override the
    family's stage-1 constants; ``scorer`` the stage-2 scorer.
    """

    key: ClassVar[str] = "nuwa"
    display: ClassVar[str] = "Nüwa"
    published_layers: ClassVar[dict[bool, tuple[int, ...]]] = {False: (16,), True: (16, 20, 24, 28)}
    prune_decisions: ClassVar[int | None] = 1
    stage_zero: ClassVar[bool] = True

    budget: int | None = None
    ratio: float | None = None
    k1: Keep | None = None
    k2: Keep | None = None
    stage2_layer: int | None = None
    layers: Sequence[int] | None = None
    decisions: int | None = None
    reroute: bool = False
    official: bool = False
    n_per_cell: int | None = None
    gate_quantile: float | None = None
    tau: float | None = None
    scorer: Scorer | None = None
    target: BudgetTarget | None = None
    then: TokenReduction | None = None
    vision: str | None = field(default=None, init=False, compare=False, repr=False)
    depth: int | None = field(default=None, init=False, compare=False, repr=False)
    views: bool = field(default=False, init=False, compare=False, repr=False)  # a multi-view family

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.reroute, bool) or not isinstance(self.official, bool):
            raise TypeError(f"{owner}(reroute={self.reroute!r}, official={self.official!r}): True or False")
        self._check_target(self.target)
        given = {
            "budget": self.budget is not None,
            "ratio": self.ratio is not None,
            "k1/k2": self.k1 is not None or self.k2 is not None,
            "target": self.target is not None,
        }
        if sum(given.values()) > 1:
            chosen = ", ".join(k for k, v in given.items() if v)
            raise ValueError(f"{owner}: give one of budget=, ratio=, k1= with k2=, target=; got {chosen}")
        if self.budget is not None and self.budget not in LLAVA_BUDGETS:
            raise ValueError(
                f"{owner}(budget={self.budget!r}): the LLaVA-1.5 release's budgets are 64, 128 and 192 "
                "(give k1= and k2= for other counts)"
            )
        if self.ratio is not None and self.ratio not in QWEN_RATIOS:
            raise ValueError(
                f"{owner}(ratio={self.ratio!r}): the Qwen2.5-VL release's ratios are 0.25, 0.5 and 0.75 "
                "(give k1= and k2= for other counts, or target=BudgetTarget(ratio=...))"
            )
        if self.then is not None:
            stage2 = {
                "k2": self.k2,
                "layers": self.layers,
                "stage2_layer": self.stage2_layer,
                "scorer": self.scorer,
            }
            check_then(owner, self.then, {**stage2, "decisions": self.decisions, "target": self.target})
        if self.k2 is not None and self.k1 is None:
            raise ValueError(f"{owner}(k2={self.k2!r}): give k1 too (anchors; k2 alone has nothing to cut)")
        if self.k1 is not None:
            check_keep_value(owner, self.k1)
            check_keep_value(owner, K2_PER_K1 if self.k2 is None else self.k2)
            if isinstance(self.k1, int) and isinstance(self.k2, int) and self.k2 > self.k1:
                raise ValueError(f"{owner}(k1={self.k1}, k2={self.k2}): stage 2 keeps at most the anchors")
        _check_int(owner, "n_per_cell", self.n_per_cell, 1, 4, "a 2×2 cell proposes 1, 2, 3 or 4 candidates")
        _check_int(owner, "stage2_layer", self.stage2_layer, 1, None, "a decoder layer index ≥ 1")
        _check_int(owner, "decisions", self.decisions, 1, None, "the number of stage-2 decisions, ≥ 1")
        if self.gate_quantile is not None and not 0.0 <= self.gate_quantile <= 1.0:
            raise ValueError(f"{owner}(gate_quantile={self.gate_quantile!r}): a quantile in [0, 1]")
        if self.tau is not None and not (isinstance(self.tau, int | float) and self.tau > 0):
            raise ValueError(f"{owner}(tau={self.tau!r}): the kernel radius (grid cells) must be > 0")
        if not self.reroute and self.decisions not in (None, 1):
            raise ValueError(f"{owner}(decisions={self.decisions}, reroute=False): Nüwa prunes once")
        self._check_layers(owner)

    def _check_layers(self, owner: str) -> None:
        if self.layers is None:
            return
        layers = tuple(self.layers)
        Schedule.of(layers, [1] * len(layers), True, owner=owner)
        object.__setattr__(self, "layers", layers)
        if not self.reroute and len(layers) != 1:
            raise ValueError(
                f"{owner}(layers={list(layers)!r}, reroute=False): Nüwa prunes once in stage 2; several "
                "stage-2 decisions are Nüwa + Reroute (reroute=True)"
            )
        if self.stage2_layer is not None and self.stage2_layer != layers[0]:
            raise ValueError(
                f"{owner}(stage2_layer={self.stage2_layer}, layers={list(layers)!r}): the first stage-2 "
                "decision is the stage-2 layer; give one of them"
            )
        if self.decisions is not None and self.decisions != len(layers):
            raise ValueError(f"{owner}(decisions={self.decisions}, layers={list(layers)!r}): give one")

    # ---- rules for the solver (torch-free) --------------------------------------------------
    @classmethod
    def default_layers(cls, num_layers: int, reroute: bool = False) -> tuple[int, ...]:
        """Stage 2 from layer 16 of 32 (scaled to the depth); reroute: four decisions from there."""
        first = scale_layers((16,), num_layers)[0]
        return spread(first, num_layers, REROUTE_DECISIONS) if reroute else (first,)

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]:
        """``a`` = K₁ (the entry), then K₁/7 at every stage-2 decision (the release's 112 → 16)."""
        return [a] + [a * K2_PER_K1] * (num_stages - 1)

    @classmethod
    def from_schedule(cls, schedule: Schedule, **settings: Any) -> Nuwa:
        """Entry = K₁ (none: every token enters), one common keep = K₂, layers = the stage-2 decisions."""
        if len(set(schedule.keep)) != 1:
            raise ValueError(
                f"Nüwa keeps the same K₂ at every stage-2 decision; got keep={list(schedule.keep)!r}"
            )
        k1 = 1.0 if schedule.entry is None else schedule.entry
        return cls(k1=k1, k2=schedule.keep[0], layers=schedule.layers, reroute=schedule.reroute, **settings)

    # ---- binding to a model ---------------------------------------------------------------
    def bind(self, adapter: ModelAdapter) -> Nuwa:
        """This method for ``adapter``'s model: its tower's release, its depth, and (a fixed grid) the
        budget checked against the grid now rather than at the first image."""
        from .views import multi_view_tap
        from .vision import check_tower

        family, release = release_for(adapter.model)
        check_release_setting("budget", self.budget, family, release)
        check_release_setting("ratio", self.ratio, family, release)
        bound = dataclasses.replace(self, then=None if self.then is None else self.then.bind(adapter))
        object.__setattr__(bound, "vision", family.vision)
        depth = len(adapter.layers)
        object.__setattr__(bound, "depth", depth)
        views = multi_view_tap(adapter) is not None
        object.__setattr__(bound, "views", views)
        if not views:
            check_tower(family.vision, adapter.model)
        grid = adapter.fixed_grid()
        if grid is not None and self.target is None:
            bound.plan_image(grid, None, depth)  # a budget the grid cannot meet fails here
        return bound

    @property
    def release(self) -> Release:
        """The bound model's release (the first release, LLaVA-1.5's, when unbound)."""
        return DEFAULT if self.vision is None else RELEASES[self.vision]

    @property
    def settings(self) -> FamilySettings:
        """Stage-1 constants of the bound model's release, with the overrides."""
        base = self.release.settings(self.official)
        return dataclasses.replace(
            base,
            gate_quantile=base.gate_quantile if self.gate_quantile is None else float(self.gate_quantile),
            tau=base.tau if self.tau is None else float(self.tau),
        )

    def _preset(self) -> tuple[Keep, Keep, int | None]:
        """``(K₁, K₂, n per cell)`` settings before an image is seen (None: fewest that fit)."""
        if self.budget is not None:
            return LLAVA_BUDGETS[self.budget]
        if self.ratio is not None:
            return QWEN_RATIOS[self.ratio]
        if self.k1 is not None:
            return self.k1, K2_PER_K1 if self.k2 is None else self.k2, None  # k1 alone: K₂ = K₁/7
        return self.release.presets[self.release.default]

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The stage-2 decision layers on a ``num_layers``-deep decoder."""
        if self.then is not None:
            return self.then.layers_for(num_layers)
        if self.layers is not None:
            return tuple(self.layers)
        if self.stage2_layer is not None:
            first = self.stage2_layer
        elif self.target is not None:
            return self.default_layers(num_layers, self.reroute)
        else:
            published = BY_SETTING["ratio"] if self.ratio is not None else self.release
            layer, depth = published.stage2
            first = min(max(round_half_up(layer * num_layers / depth), 1), num_layers - 1)
        if not self.reroute:
            return (first,)
        return spread(first, num_layers, self.decisions or REROUTE_DECISIONS)

    def check_depth(self, num_layers: int) -> tuple[int, ...]:
        layers = self.layers_for(num_layers)
        for layer in layers:
            if not 1 <= layer < num_layers:
                raise ValueError(
                    f"Nüwa stage-2 layer {layer} (stage2_layer={self.stage2_layer!r}, layers="
                    f"{None if self.layers is None else list(self.layers)!r}) is out of range: this decoder "
                    f"has {num_layers} layers, so stage-2 decisions must be in 1..{num_layers - 1}"
                )
        return layers

    def schedule(self) -> Schedule | None:
        """The schedule (entry K₁, K₂ at each stage-2 decision) on the bound depth (else 32), or None
        with a target."""
        if self.target is not None:
            return None
        k1, k2, _ = self._preset()
        if self.then is not None:
            inner = self.then.schedule()
            return None if inner is None else dataclasses.replace(inner, owner=self.name, entry=k1)
        layers = self.layers_for(self.depth or 32)
        return Schedule(layers, (k2,) * len(layers), self.reroute, owner=type(self).__name__, entry=k1)

    def plan_image(self, grid: tuple[int, int], shape: Any, num_layers: int) -> ImagePlan:
        """Stage 1 for an image of ``grid`` tokens (``shape``: the decoder's, for a target)."""
        from .plan import plan_grid

        return plan_grid(self, grid, shape, num_layers)

    def entry(
        self, n: int, shape: Any, num_layers: int
    ) -> tuple[int, tuple[Keep, ...], bool, int | None, Any]:
        """``(K₁, later keeps, K₁ was a fraction (clipped to the candidates), preset quota, composed
        counts)`` for an image of ``n`` tokens."""
        layers = self.layers_for(num_layers)
        then = None if self.then is None else self.then.keep_counts(num_layers, shape)
        preset_n = None
        keep: tuple[Keep, ...]
        if self.target is not None:
            from ...budget.solver import solve_for_target

            # `type`, as solve_for_target takes it: mypy checks type[Nuwa] against the cache's Hashable
            # with Nuwa's instance __hash__ and refuses it; a class is hashable
            method: type = type(self)
            solved = solve_for_target(shape, n, method, self.reroute, self.target, layers)
            k1, keep = solved.keep[0], tuple(solved.keep[1:])
            clip = True
        else:
            k1_setting, k2, preset_n = self._preset()
            keep = (k2,) * len(layers)
            clip = isinstance(k1_setting, float)
            k1 = min(n, math.ceil(n * k1_setting)) if isinstance(k1_setting, float) else k1_setting
        return k1, keep, clip, preset_n, then

    def keep_counts(self, num_layers: int, shape: Any):
        """Stage-2 counts for an image of ``n`` tokens, assuming a square grid (the engine takes each
        image's counts from its stage 1 instead)."""
        from .plan import plan_of

        def counts(n_visual: int) -> tuple[int, ...]:
            plan = plan_of(self, n_visual, shape, num_layers)
            return plan.counts(plan.k1)

        return counts

    def resolve(self, shape: Any, n_visual: int) -> Schedule:
        """Integer entry (K₁) and stage-2 counts for one image of ``n_visual`` tokens (a square grid)."""
        from .plan import plan_of

        layers = self.check_depth(shape.num_layers)
        plan = plan_of(self, n_visual, shape, shape.num_layers)
        return Schedule(layers, plan.counts(plan.k1), self.reroute, owner=self.name, entry=plan.k1)

    def make_scorer(self) -> Scorer | Selector:
        """The release's: at the layer before the stage-2 layer, LLaVA-1.5's last token with the head
        mean; Qwen2.5-VL's last three query rows with the head max (without a causal mask among them
        when ``official``)."""
        if self.then is not None:
            return self.then.make_scorer()
        if self.scorer is not None:
            return self.scorer
        return self.release.scorer(self.official)

    def vision_stage(self, adapter: ModelAdapter) -> VisionStage:
        from ...budget.shapes import ModelShape
        from .plan import plan_of
        from .vision import NuwaVision

        composed = self.target is not None or self.then is not None
        shape = ModelShape.from_config(adapter.model.config) if composed else None
        depth = len(adapter.layers)
        if self.views:
            from .views import NuwaViews, multi_view_tap

            tap = multi_view_tap(adapter)
            return NuwaViews(self, tap, lambda n: plan_of(self, n, shape, depth))
        return NuwaVision(self, lambda grid: self.plan_image(grid, shape, depth))


def _check_int(owner: str, name: str, value: Any, low: int, high: int | None, what: str) -> None:
    if value is None:
        return
    out_of_range = value < low or (high is not None and value > high) if isinstance(value, int) else True
    if isinstance(value, bool) or out_of_range:
        raise ValueError(f"{owner}({name}={value!r}): {what}")
