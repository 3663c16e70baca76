"""Schedule solver: integer keep counts that hit an avg_T (or FLOPs) target, and the published schedules.

Pure Python. Rules (documented in ``docs/budgets.md``), with ``a`` the first stage's count and
``n`` the visual tokens per image, ``S`` decisions:

* FastV prune: one decision, keep ``[a]``.
* FastV + Reroute: ``S`` re-decisions with the same count, keep ``[a] * S``.
* PDrop prune: constant retention ``ρ = a / n`` per decision, keep ``[a, aρ, aρ², ...]`` (``n·ρ^(i+1)``);
  this is the rule behind the published PDrop baseline's 192 and 128 tiers.
* PDrop + Reroute: keep ``[a, a, a/2, a/4, ...]`` (``a / 2^(i-1)`` from the third decision on).

Rule values are rounded half up and clamped to ``1..n``. ``a`` is searched over the integers
``1..n``; if the closest ``a`` misses an avg_T target by more than 0.5 token, individual stage counts
are moved by ±1 (fewest changes, then closest; keep counts stay non-increasing).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

from .flops import Budget, ModelShape, compute_budget, layer_flops, stage_counts

if TYPE_CHECKING:
    from ..methods import TokenReduction

__all__ = [
    "METHODS",
    "PUBLISHED",
    "PublishedSchedule",
    "SolvedPair",
    "SolvedSchedule",
    "default_layers",
    "parse_method",
    "published_avg_t",
    "published_schedule",
    "solve",
    "solve_schedule",
]

METHODS = ("fastv", "pdrop")
TOLERANCE = 0.5
_REFERENCE_DEPTH = 32
_PUBLISHED_LAYERS_32 = {
    ("fastv", False): (3,),
    ("fastv", True): (3, 7, 15, 23),
    ("pdrop", False): (2, 7, 15, 23),
    ("pdrop", True): (2, 7, 15, 23),
}
_DISPLAY = {"fastv": "FastV", "pdrop": "PDrop"}


def parse_method(method: str, reroute: bool = False) -> tuple[str, bool]:
    """``"fastv"``, ``"PDrop"``, ``"FastV + Reroute"``, ``"pdrop_reroute"``... → ``(method, reroute)``."""
    text = method.lower().replace(" ", "").replace("_", "+").replace("-", "+")
    if text.endswith("+reroute"):
        text, reroute = text.removesuffix("+reroute"), True
    if text not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: 'fastv', 'pdrop' (optionally '+ reroute')")
    return text, bool(reroute)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def default_layers(method: str, num_layers: int, reroute: bool = False) -> tuple[int, ...]:
    """Published decision layers, scaled from 32 layers to ``num_layers``.

    32 layers: FastV [3], FastV + Reroute [3, 7, 15, 23], PDrop (and + Reroute) [2, 7, 15, 23].
    Rule: ``l → floor(l·L/32 + 0.5)`` (round half up), clamped to ``1..L-1``, then bumped to stay
    strictly increasing. 28 layers give [3, 6, 13, 20] and [2, 6, 13, 20], as the paper used.
    """
    method, reroute = parse_method(method, reroute)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers={num_layers!r} must be an int ≥ 2")
    out: list[int] = []
    for layer in _PUBLISHED_LAYERS_32[(method, reroute)]:
        scaled = min(max(_round_half_up(layer * num_layers / _REFERENCE_DEPTH), 1), num_layers - 1)
        if out and scaled <= out[-1]:
            scaled = out[-1] + 1
        if scaled > num_layers - 1:
            count = len(_PUBLISHED_LAYERS_32[(method, reroute)])
            raise ValueError(
                f"a {num_layers}-layer decoder is too shallow for {count} decisions in "
                f"1..{num_layers - 1}; pass layers= explicitly"
            )
        out.append(scaled)
    return tuple(out)


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

    @property
    def name(self) -> str:
        return _DISPLAY[self.method] + (" + Reroute" if self.reroute else "")

    @property
    def keep_fractions(self) -> tuple[float, ...]:
        return tuple(k / self.n_visual for k in self.keep)

    def to_method(self) -> TokenReduction:
        """The method that runs this schedule: ``FastV`` for FastV prune, else ``PDrop``."""
        from ..methods import FastV, PDrop  # torch-free at import: the budget CLI loads this module

        if self.method == "fastv" and not self.reroute:
            return FastV(layer=self.layers[0], keep=self.keep[0])
        return PDrop(layers=list(self.layers), keep=list(self.keep), reroute=self.reroute)

    def budget(self, shape: ModelShape, n_text: int = 0, num_images: int = 1) -> Budget:
        """The full :class:`~vlm_reroute.budget.Budget` of this schedule on ``shape``."""
        if shape.num_layers != self.num_layers:
            raise ValueError(f"schedule is for {self.num_layers} layers, {shape.name} has {shape.num_layers}")
        return compute_budget(
            shape, self.n_visual, n_text, self.layers, self.keep, self.reroute, num_images=num_images
        )


@dataclass(frozen=True)
class SolvedPair:
    """A prune schedule and the reroute schedule solved for the same target."""

    prune: SolvedSchedule
    reroute: SolvedSchedule
    target_avg_t: float | None
    target_flops_fraction: float | None


def _rule(method: str, reroute: bool, n: int, num_stages: int) -> Callable[[int], tuple[int, ...]]:
    """Integer keep counts from the first count ``a`` (see module docstring)."""

    def realise(values: Sequence[float]) -> tuple[int, ...]:
        return tuple(min(n, max(1, _round_half_up(v))) for v in values)

    if method == "fastv":
        return lambda a: realise([a] * num_stages)
    if not reroute:
        return lambda a: realise([a * (a / n) ** i for i in range(num_stages)])
    return lambda a: realise([a if i < 2 else a / 2 ** (i - 1) for i in range(num_stages)])


def _closest_a(n: int, value: Callable[[int], float], target: float) -> int:
    """The ``a`` in ``1..n`` whose ``value(a)`` (non-decreasing in ``a``) is closest to ``target``."""
    lo, hi = 1, n
    while lo < hi:  # smallest a with value(a) >= target (or n)
        mid = (lo + hi) // 2
        if value(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and abs(value(lo - 1) - target) <= abs(value(lo) - target):
        return lo - 1
    return lo


def _close_gap(
    keep: tuple[int, ...], lengths: Sequence[int], goal: float, tol: float, n: int, same_count: bool
) -> tuple[int, ...]:
    """Move stage counts by ±1 so that ``Σ lengths·keep`` is within ``tol`` of ``goal`` (layer-token units).

    Tries every ±1 combination (fewest changes first, then closest); if none is close enough, walks
    one unit at a time: a stage moves the total by its length, less than ``2·tol``.
    """

    def err(k: Sequence[int]) -> float:
        return abs(sum(x * w for x, w in zip(k, lengths, strict=True)) - goal)

    def ok(k: Sequence[int]) -> bool:
        in_range = all(1 <= x <= n for x in k) and all(b <= a for a, b in pairwise(k))
        return in_range and (not same_count or len(set(k)) == 1)

    if err(keep) <= tol:
        return keep
    if len(keep) <= 8:
        candidates = (
            tuple(k + d for k, d in zip(keep, delta, strict=True))
            for delta in itertools.product((-1, 0, 1), repeat=len(keep))
        )
        scored = [
            (sum(abs(c - k) for c, k in zip(cand, keep, strict=True)), err(cand), cand)
            for cand in candidates
            if ok(cand) and err(cand) <= tol
        ]
        if scored:
            return min(scored)[2]
    cur = list(keep)
    for _ in range(len(keep) * n):
        total = sum(x * w for x, w in zip(cur, lengths, strict=True))
        if abs(total - goal) <= tol:
            break
        step = 1 if total < goal else -1
        if same_count:
            cand = [x + step for x in cur]
        else:  # raise the earliest stage that may grow, or lower the latest that may shrink
            order = range(len(cur)) if step > 0 else reversed(range(len(cur)))
            cand = None
            for i in order:
                trial = cur[:i] + [cur[i] + step] + cur[i + 1 :]
                if ok(trial):
                    cand = trial
                    break
        if cand is None or not ok(cand):
            break
        cur = cand
    return tuple(cur)


def solve_schedule(
    shape_or_num_layers: ModelShape | int,
    n_visual: int,
    method: str,
    reroute: bool = False,
    target_avg_t: float | None = None,
    target_flops_fraction: float | None = None,
    layers: Sequence[int] | None = None,
    n_text: int = 0,
) -> SolvedSchedule:
    """Solve one schedule (prune or reroute) for exactly one of the two targets.

    ``target_avg_t`` is hit within ±0.5 token. ``target_flops_fraction`` in (0, 1] picks the ``a``
    whose PDrop-convention FLOPs ratio to vanilla is closest, with ``n`` = ``n_text`` + visual tokens
    (needs a :class:`ModelShape`). ``layers`` defaults to :func:`default_layers`.
    """
    method, reroute = parse_method(method, reroute)
    shape = shape_or_num_layers if isinstance(shape_or_num_layers, ModelShape) else None
    num_layers = shape.num_layers if shape is not None else shape_or_num_layers
    if isinstance(n_visual, bool) or not isinstance(n_visual, int) or n_visual < 1:
        raise ValueError(f"n_visual={n_visual!r} must be an int ≥ 1")
    if (target_avg_t is None) == (target_flops_fraction is None):
        raise ValueError("give exactly one of target_avg_t and target_flops_fraction")
    if layers is None:
        layers = default_layers(method, num_layers, reroute)
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must hold at least one decision layer")
    if layers != tuple(sorted(set(layers))) or not 0 <= layers[0] <= layers[-1] < num_layers:
        raise ValueError(
            f"layers={list(layers)} must be strictly increasing and within 0..{num_layers - 1} "
            f"for a {num_layers}-layer decoder"
        )
    rule = _rule(method, reroute, n_visual, len(layers))
    lengths = [b - a for a, b in zip(layers, [*layers[1:], num_layers], strict=True)]
    fixed = layers[0] * n_visual  # layer-tokens before the first decision
    label = (
        f"{_DISPLAY[method]}{' + Reroute' if reroute else ''} (layers {list(layers)}, n_visual={n_visual})"
    )

    def avg(keep: Sequence[int]) -> float:
        return (fixed + sum(k * w for k, w in zip(keep, lengths, strict=True))) / num_layers

    if target_avg_t is not None:
        lo, hi = avg(rule(1)), avg(rule(n_visual))
        if not lo - TOLERANCE <= target_avg_t <= hi + TOLERANCE:
            raise ValueError(
                f"target_avg_t={target_avg_t} is not reachable for {label}: reachable avg_T is "
                f"{lo:.2f}..{hi:.2f} (layers before the first decision carry all {n_visual} tokens)"
            )
        a = _closest_a(n_visual, lambda a: avg(rule(a)), target_avg_t)
        goal, tol = target_avg_t * num_layers - fixed, TOLERANCE * num_layers
        keep = _close_gap(rule(a), lengths, goal, tol, n_visual, same_count=method == "fastv")
        if abs(avg(keep) - target_avg_t) > TOLERANCE:  # pragma: no cover - guarded by the range check
            raise ValueError(f"could not reach target_avg_t={target_avg_t} within ±{TOLERANCE} for {label}")
    else:
        if shape is None:
            raise ValueError(
                "target_flops_fraction needs a ModelShape (FLOPs depend on the model's dimensions)"
            )
        if not 0 < target_flops_fraction <= 1:
            raise ValueError(f"target_flops_fraction={target_flops_fraction} must be in (0, 1]")
        vanilla = num_layers * layer_flops(shape, n_text + n_visual, "pdrop")

        def ratio(keep: Sequence[int]) -> float:
            counts = stage_counts(num_layers, n_visual, layers, keep)
            return sum(layer_flops(shape, n_text + v, "pdrop") for v in counts) / vanilla

        lo, hi = ratio(rule(1)), ratio(rule(n_visual))
        if not lo <= target_flops_fraction <= hi:
            raise ValueError(
                f"target_flops_fraction={target_flops_fraction} is not reachable for {label} on {shape.name} "
                f"with n_text={n_text}: reachable PDrop-convention FLOPs ratio is {lo:.4f}..{hi:.4f}"
            )
        keep = rule(_closest_a(n_visual, lambda a: ratio(rule(a)), target_flops_fraction))
    return SolvedSchedule(method, reroute, layers, tuple(keep), avg(keep), num_layers, n_visual)


def solve(
    shape_or_num_layers: ModelShape | int,
    n_visual: int,
    method: str,
    target_avg_t: float | None = None,
    target_flops_fraction: float | None = None,
    layers: Sequence[int] | None = None,
    n_text: int = 0,
) -> SolvedPair:
    """Solve the prune schedule and its reroute counterpart for the same target.

    ``layers`` (optional) overrides the decision layers of both: the reroute schedule uses all of
    them; FastV prune uses ``layers[0]`` only (it has one decision), PDrop prune uses all of them.
    """
    method, _ = parse_method(method)
    prune_layers = reroute_layers = None
    if layers is not None:
        layers = tuple(layers)
        reroute_layers = layers
        prune_layers = layers[:1] if method == "fastv" else layers
    kwargs = dict(target_avg_t=target_avg_t, target_flops_fraction=target_flops_fraction, n_text=n_text)
    return SolvedPair(
        prune=solve_schedule(shape_or_num_layers, n_visual, method, False, layers=prune_layers, **kwargs),
        reroute=solve_schedule(shape_or_num_layers, n_visual, method, True, layers=reroute_layers, **kwargs),
        target_avg_t=target_avg_t,
        target_flops_fraction=target_flops_fraction,
    )


# --------------------------------------------------------------------------------------------
# Published schedules (method.md): keep as fractions of 576
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedSchedule:
    """A schedule as published: decision layers and keep fractions of ``n_visual``."""

    model: str
    tier: int
    method: str
    reroute: bool
    layers: tuple[int, ...]
    fractions: tuple[float, ...]
    num_layers: int
    n_visual: int = 576

    @property
    def name(self) -> str:
        return _DISPLAY[self.method] + (" + Reroute" if self.reroute else "")

    @property
    def keep(self) -> tuple[int, ...]:
        """Counts as the published code resolves them: ``max(1, int(n_visual · f))``."""
        return tuple(max(1, int(self.n_visual * f)) for f in self.fractions)

    @property
    def avg_t(self) -> float:
        return published_avg_t(self)


def published_avg_t(entry: PublishedSchedule) -> float:
    """avg_T that a published schedule actually achieves (counts resolved as the published code does)."""
    counts = stage_counts(entry.num_layers, entry.n_visual, entry.layers, entry.keep)
    return sum(counts) / entry.num_layers


_FASTV_F = {192: 0.2644, 128: 0.1418, 64: 0.01916}
_PDROP_F = {
    192: (0.5965, 0.3558, 0.2123, 0.1266),
    128: (0.4570, 0.2088, 0.0954, 0.0436),
    64: (0.2789, 0.0937, 0.0315, 0.0106),
}
_PDROP_REROUTE_A = {192: 0.4502, 128: 0.2655, 64: 0.1392}
# model: (num_layers, FastV layer, FastV + Reroute layers, PDrop layers). The Qwen FastV baseline
# layer (3) is the first of its re-decision layers; method.md gives only the multi-decision lists.
_PUBLISHED_MODELS = {
    "llava-1.5": (32, (3,), (3, 7, 15, 23), (2, 7, 15, 23)),
    "qwen2.5-vl-7b": (28, (3,), (3, 6, 13, 20), (2, 6, 13, 20)),
}


def _published() -> tuple[PublishedSchedule, ...]:
    out = []
    for model, (nl, fastv, fastv_rr, pdrop) in _PUBLISHED_MODELS.items():
        for tier in (192, 128, 64):
            f, a = _FASTV_F[tier], _PDROP_REROUTE_A[tier]
            out += [
                PublishedSchedule(model, tier, "fastv", False, fastv, (f,), nl),
                PublishedSchedule(model, tier, "fastv", True, fastv_rr, (f,) * len(fastv_rr), nl),
                PublishedSchedule(model, tier, "pdrop", False, pdrop, _PDROP_F[tier], nl),
                PublishedSchedule(model, tier, "pdrop", True, pdrop, (a, a, a / 2, a / 4), nl),
            ]
    return tuple(out)


PUBLISHED: tuple[PublishedSchedule, ...] = _published()


def published_schedule(model: str, tier: int, method: str, reroute: bool = False) -> PublishedSchedule:
    """Look up a published schedule (``model``: ``"llava-1.5"`` or ``"qwen2.5-vl-7b"``)."""
    method, reroute = parse_method(method, reroute)
    for entry in PUBLISHED:
        if (entry.model, entry.tier, entry.method, entry.reroute) == (model, tier, method, reroute):
            return entry
    raise ValueError(
        f"no published schedule for model={model!r}, tier={tier!r}; models: {sorted(_PUBLISHED_MODELS)}, "
        "tiers: 192, 128, 64"
    )
