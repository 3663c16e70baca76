"""Schedule solver: integer keep counts that hit an avg_T (or FLOPs) target, and the published schedules.

Pure Python. Each method class owns its rule (``keep_rule``: keep counts from the first stage's
count ``a``) and its default decision layers; the solver reads them as a
:class:`~.rules.ScheduleRule` (registered by the method, ``rules.py``):

* FastV prune: one decision, keep ``[a]``; FastV + Reroute: ``S`` re-decisions, keep ``[a] * S``.
* PDrop prune: constant retention ``ρ = a / n`` per decision, keep ``[a, aρ, aρ², ...]``;
  this is the rule behind the published PDrop baseline's 192 and 128 tiers.
* PDrop + Reroute: keep ``[a, a, a/2, a/4, ...]`` (``a / 2^(i-1)`` from the third decision on).
* Nüwa (and + Reroute): ``a`` is K₁, the anchors entering the language model (the schedule's
  entry, written as layer 0 in solved schedules); every decision keeps ``a / 7`` (the release's
  K₂ = K₁ / 7: 112 → 16, 224 → 32, 336 → 48).

Rule values are rounded half up and clamped to ``1..n``. ``a`` is searched over the integers
``1..n``; if the closest ``a`` misses an avg_T target by more than 0.5 token, individual stage counts
are moved by ±1 (fewest changes, then closest; keep counts stay non-increasing).

``withdraw_at=K`` (VTW, arXiv 2405.05803) ends the last stage at layer ``K``: the layers from ``K`` on
carry no visual token, so the same target needs larger counts in the stages before it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .flops import Budget, ModelShape, compute_budget, layer_flops, visual_tokens_per_layer
from .published import PUBLISHED, PublishedSchedule, published_avg_t, published_schedule
from .rules import ScheduleRule, round_half_up, rule_for, rule_names
from .schedule import Schedule
from .search import close_gap, closest_a
from .target import BudgetTarget

__all__ = [
    "PUBLISHED",
    "PublishedSchedule",
    "SolvedPair",
    "SolvedSchedule",
    "default_layers",
    "parse_method",
    "published_avg_t",
    "published_schedule",
    "solve",
    "solve_for_target",
    "solve_schedule",
    "stage_one_methods",
    "tabulated_methods",
    "UnreachableTargetWarning",
]

TOLERANCE = 0.5


def parse_method(method: str | type, reroute: bool = False) -> tuple[str, bool]:
    """``"fastv"``, ``"PDrop"``, ``"FastV + Reroute"``, ``"pdrop_reroute"``... → ``(key, reroute)``."""
    cls, reroute = rule_for(method, reroute)
    return cls.key, reroute


def tabulated_methods() -> tuple[str, ...]:
    """Registry keys of the methods with a schedule rule of their own (budget tables list these)."""
    return tuple(k for k in rule_names() if rule_for(k)[0].tabulated)


def stage_one_methods() -> tuple[str, ...]:
    """Registry keys of the vision-side methods without rows of their own in :func:`tabulated_methods`
    (VisionZip, DivPrune): alone they keep a count before the language model and every layer carries
    it, so their reroute form runs what their prune form runs; budget tables give them one row."""
    return tuple(k for k in rule_names() if rule_for(k)[0].stage_zero and not rule_for(k)[0].tabulated)


def default_layers(method: str | type, num_layers: int, reroute: bool = False) -> tuple[int, ...]:
    """The method's published decision layers scaled to ``num_layers`` (see ``scale_layers``).

    32 layers: FastV [3], FastV + Reroute [3, 7, 15, 23], PDrop (and + Reroute) [2, 7, 15, 23];
    28 layers give [3, 6, 13, 20] and [2, 6, 13, 20], as the paper used.
    """
    cls, reroute = rule_for(method, reroute)
    return cls.default_layers(num_layers, reroute)


# --------------------------------------------------------------------------------------------
# Solved schedules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolvedSchedule:
    """A schedule with integer keep counts (per image) and the avg_T it achieves."""

    method: str
    reroute: bool
    layers: tuple[int, ...]
    keep: tuple[int, ...]
    avg_t: float
    num_layers: int
    n_visual: int
    withdraw_at: int | None = None

    @property
    def name(self) -> str:
        return rule_for(self.method)[0].label(self.reroute)

    @property
    def keep_fractions(self) -> tuple[float, ...]:
        return tuple(k / self.n_visual for k in self.keep)

    @property
    def schedule(self) -> Schedule:
        return Schedule.from_budget_form(
            self.layers, self.keep, self.reroute, owner=self.name, withdraw_at=self.withdraw_at
        )

    def to_method(self, **settings: Any) -> Any:
        """The method that runs this schedule (its registered class, e.g. ``FastV`` or ``PDrop``)."""
        if self.withdraw_at is not None:
            settings = {"withdraw_at": self.withdraw_at, **settings}
        return rule_for(self.method)[0].from_schedule(self.schedule, **settings)

    @property
    def entry(self) -> int | None:
        """Visual tokens entering the language model (layer 0 of ``layers``), or None: all."""
        return self.keep[0] if self.layers and self.layers[0] == 0 else None

    def budget(self, shape: ModelShape, n_text: int = 0, num_images: int = 1) -> Budget:
        """The full :class:`~vlm_reroute.budget.Budget` of this schedule on ``shape``."""
        if shape.num_layers != self.num_layers:
            raise ValueError(f"schedule is for {self.num_layers} layers, {shape.name} has {shape.num_layers}")
        return compute_budget(
            shape,
            self.n_visual,
            n_text,
            self.layers,
            self.keep,
            self.reroute,
            num_images=num_images,
            withdraw_at=self.withdraw_at,
        )


@dataclass(frozen=True)
class SolvedPair:
    """A prune schedule and the reroute schedule solved for the same target: ``avg_t`` or
    ``flops_fraction`` as asked (what each schedule achieves is its own ``avg_t``)."""

    prune: SolvedSchedule
    reroute: SolvedSchedule
    avg_t: float | None
    flops_fraction: float | None


def _rule(
    cls: type[ScheduleRule], reroute: bool, n: int, num_stages: int
) -> Callable[[int], tuple[int, ...]]:
    """Integer keep counts from the first count ``a``: the method's rule, rounded and clamped."""

    def realise(a: int) -> tuple[int, ...]:
        return tuple(min(n, max(1, round_half_up(v))) for v in cls.keep_rule(a, n, num_stages, reroute))

    return realise


class _Problem:
    """One method's rule on one decoder and image size: avg_T and FLOPs as functions of ``a``."""

    def __init__(
        self,
        shape_or_num_layers: ModelShape | int,
        n_visual: int,
        method: str | type,
        reroute: bool,
        layers: Sequence[int] | None,
        n_text: int,
        withdraw_at: int | None = None,
    ) -> None:
        self.cls, self.reroute = rule_for(method, reroute)
        self.shape: ModelShape | None
        if isinstance(shape_or_num_layers, ModelShape):
            self.shape, nl = shape_or_num_layers, shape_or_num_layers.num_layers
        else:
            self.shape, nl = None, shape_or_num_layers
        if isinstance(n_visual, bool) or not isinstance(n_visual, int) or n_visual < 1:
            raise ValueError(f"n_visual={n_visual!r} must be an int ≥ 1 (visual tokens per image)")
        self.num_layers, self.n_visual, self.n_text = nl, n_visual, n_text
        layers = self.cls.default_layers(nl, self.reroute) if layers is None else tuple(layers)
        owner = self.cls.label(self.reroute)
        Schedule.of(layers, [1] * len(layers), True, owner=owner, withdraw_at=withdraw_at).check_depth(nl)
        # a method that reduces before the language model: its first count enters layer 0
        self.starts = (0, *layers) if self.cls.stage_zero else layers
        self.layers, self.withdraw_at = layers, withdraw_at
        self.rule = _rule(self.cls, self.reroute, n_visual, len(self.starts))
        end = nl if withdraw_at is None else withdraw_at  # no visual token from withdraw_at on
        self.lengths = [b - a for a, b in zip(self.starts, [*self.starts[1:], end], strict=True)]
        self.fixed = self.starts[0] * n_visual  # layer-tokens before the first count applies
        self.label = f"{self.cls.label(self.reroute)} (layers {list(layers)}, n_visual={n_visual})"

    def avg(self, keep: Sequence[int]) -> float:
        return (self.fixed + sum(k * w for k, w in zip(keep, self.lengths, strict=True))) / self.num_layers

    def avg_range(self) -> tuple[float, float]:
        return self.avg(self.rule(1)), self.avg(self.rule(self.n_visual))

    def flops_ratio(self, keep: Sequence[int]) -> float:
        shape, n_text = self._flops_shape(), self.n_text
        vanilla = self.num_layers * layer_flops(shape, n_text + self.n_visual, "pdrop")
        counts = visual_tokens_per_layer(self.num_layers, self.n_visual, self.starts, keep, self.withdraw_at)
        return sum(layer_flops(shape, n_text + v, "pdrop") for v in counts) / vanilla

    def flops_range(self) -> tuple[float, float]:
        return self.flops_ratio(self.rule(1)), self.flops_ratio(self.rule(self.n_visual))

    def _flops_shape(self) -> ModelShape:
        if self.shape is None:
            raise ValueError("a FLOPs target needs a ModelShape (FLOPs depend on the model's dimensions)")
        return self.shape

    def for_avg_t(self, target: float) -> SolvedSchedule:
        a = closest_a(self.n_visual, lambda a: self.avg(self.rule(a)), target)
        goal, tol = target * self.num_layers - self.fixed, TOLERANCE * self.num_layers
        keep = close_gap(self.rule(a), self.lengths, goal, tol, self.n_visual, self.cls.same_count)
        if abs(self.avg(keep) - target) > TOLERANCE:  # pragma: no cover - guarded by the range checks
            raise ValueError(f"could not reach avg_T={target} within ±{TOLERANCE} for {self.label}")
        return self.solved(keep)

    def for_flops(self, target: float) -> SolvedSchedule:
        return self.solved(
            self.rule(closest_a(self.n_visual, lambda a: self.flops_ratio(self.rule(a)), target))
        )

    def solved(self, keep: Sequence[int]) -> SolvedSchedule:
        return SolvedSchedule(
            self.cls.key,
            self.reroute,
            self.starts,
            tuple(keep),
            self.avg(keep),
            self.num_layers,
            self.n_visual,
            self.withdraw_at,
        )

    def avg_t_message(self, target: float) -> str:
        lo, hi = self.avg_range()
        return (
            f"target avg_T={target:g} is not reachable for {self.label}: reachable avg_T is "
            f"{lo:.2f}..{hi:.2f} ({self._floor_reason()})"
        )

    def _floor_reason(self) -> str:
        if self.cls.stage_zero:
            return "the tokens entering the language model carry every layer up to the first decision"
        return f"layers before the first decision carry all {self.n_visual} tokens"

    def flops_message(self, target: float) -> str:
        lo, hi = self.flops_range()
        where = f"{self.label} on {self._flops_shape().name} with n_text={self.n_text}"
        return (
            f"target FLOPs fraction={target:g} is not reachable for {where}: reachable "
            f"PDrop-convention FLOPs ratio is {lo:.4f}..{hi:.4f}"
        )


def solve_schedule(
    shape_or_num_layers: ModelShape | int,
    n_visual: int,
    method: str | type,
    reroute: bool = False,
    avg_t: float | None = None,
    flops_fraction: float | None = None,
    layers: Sequence[int] | None = None,
    n_text: int = 0,
    withdraw_at: int | None = None,
) -> SolvedSchedule:
    """Solve one schedule (prune or reroute) for exactly one of the two targets; unreachable → error.

    ``avg_t`` (visual tokens per layer, the quantity the command line calls ``--tier``) is hit within
    ±0.5 token. ``flops_fraction`` in (0, 1] picks the ``a`` whose PDrop-convention FLOPs ratio to
    vanilla is closest, with ``n`` = ``n_text`` + visual tokens (needs a :class:`ModelShape`).
    ``layers`` defaults to the method's :func:`default_layers`; ``withdraw_at`` ends the last stage.
    """
    problem = _Problem(shape_or_num_layers, n_visual, method, reroute, layers, n_text, withdraw_at)
    if (avg_t is None) == (flops_fraction is None):
        raise ValueError("give exactly one of avg_t and flops_fraction")
    if avg_t is not None:
        lo, hi = problem.avg_range()
        if not lo - TOLERANCE <= avg_t <= hi + TOLERANCE:
            raise ValueError(problem.avg_t_message(avg_t))
        return problem.for_avg_t(avg_t)
    assert flops_fraction is not None  # exactly one of the two (checked above)
    if not 0 < flops_fraction <= 1:
        raise ValueError(f"flops_fraction={flops_fraction} must be in (0, 1]")
    lo, hi = problem.flops_range()
    if not lo <= flops_fraction <= hi:
        raise ValueError(problem.flops_message(flops_fraction))
    return problem.for_flops(flops_fraction)


class UnreachableTargetWarning(UserWarning):
    """A budget target outside what a schedule can reach was clamped to the nearest reachable one."""


@lru_cache(maxsize=4096)
def solve_for_target(
    shape_or_num_layers: ModelShape | int,
    n_visual: int,
    method: str | type,
    reroute: bool,
    target: BudgetTarget,
    layers: tuple[int, ...] | None = None,
    n_text: int = 0,
    withdraw_at: int | None = None,
) -> SolvedSchedule:
    """Solve ``target`` for one image of ``n_visual`` tokens (cached: called at every prefill).

    An unreachable target is clamped to the nearest reachable value with one
    :class:`UnreachableTargetWarning` naming what was used; ``target.strict`` makes it an error.
    """
    problem = _Problem(shape_or_num_layers, n_visual, method, reroute, layers, n_text, withdraw_at)
    avg_t = target.avg_t_for(n_visual)
    if avg_t is not None:
        lo, hi = problem.avg_range()
        if lo - TOLERANCE <= avg_t <= hi + TOLERANCE:
            return problem.for_avg_t(avg_t)
        if target.strict:
            raise ValueError(problem.avg_t_message(avg_t))
        clamped = min(max(avg_t, lo), hi)
        warnings.warn(
            f"{problem.avg_t_message(avg_t)}; using avg_T={clamped:.2f} ({target.describe()} asked for "
            f"{avg_t:.2f} on an image of {n_visual} tokens)",
            UnreachableTargetWarning,
            stacklevel=2,
        )
        return problem.for_avg_t(clamped)
    lo, hi = problem.flops_range()
    fraction = target.flops_fraction
    assert fraction is not None  # avg_t_for is None only for a FLOPs target
    if lo <= fraction <= hi:
        return problem.for_flops(fraction)
    if target.strict:
        raise ValueError(problem.flops_message(fraction))
    clamped = min(max(fraction, lo), hi)
    warnings.warn(
        f"{problem.flops_message(fraction)}; using FLOPs fraction={clamped:.4f}",
        UnreachableTargetWarning,
        stacklevel=2,
    )
    return problem.for_flops(clamped)


def solve(
    shape_or_num_layers: ModelShape | int,
    n_visual: int,
    method: str | type,
    avg_t: float | None = None,
    flops_fraction: float | None = None,
    layers: Sequence[int] | None = None,
    n_text: int = 0,
    withdraw_at: int | None = None,
) -> SolvedPair:
    """Solve the prune schedule and its reroute counterpart for the same target.

    ``layers`` (optional) overrides the decision layers of both: the reroute schedule uses all of
    them; a method that prunes with one decision (FastV) uses ``layers[0]`` for prune.
    """
    cls, _ = rule_for(method)
    prune_layers = reroute_layers = None
    if layers is not None:
        layers = tuple(layers)
        reroute_layers = layers
        prune_layers = layers[: cls.prune_decisions] if cls.prune_decisions else layers

    def solved(reroute: bool, layers: Sequence[int] | None) -> SolvedSchedule:
        return solve_schedule(
            shape_or_num_layers, n_visual, cls, reroute, avg_t, flops_fraction, layers, n_text, withdraw_at
        )

    return SolvedPair(
        prune=solved(False, prune_layers),
        reroute=solved(True, reroute_layers),
        avg_t=avg_t,
        flops_fraction=flops_fraction,
    )
