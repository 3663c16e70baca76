"""What every token-reduction method shares: settings, schedule rules and the context manager.

A method is a small frozen dataclass, like a kvpress press: its settings, its scorer and the rules
the solver needs (default decision layers for a depth, how keep counts follow from the first
stage's count). ``with method(model) as trace:`` routes every forward and ``generate()`` call
inside the block; leaving it removes every hook, so the model is exactly what it was.

This module imports no torch at import time, so the torch-free budget solver and the
``vlm-reroute budget`` command can read the registry's rules.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..budget.rules import round_half_up
from ..budget.schedule import Keep, Schedule, check_withdraw
from ..budget.target import BudgetTarget
from ..kinds import ScoreFrom

if TYPE_CHECKING:
    from torch import nn

    from ..adapters.base import ModelAdapter
    from ..engine.trace import Trace
    from ..engine.vision import VisionStage
    from ..scoring.base import Scorer, Selector

_REFERENCE_DEPTH = 32
_ACTIVE: weakref.WeakSet = weakref.WeakSet()


def scale_layers(published: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Decision layers published for 32 layers, scaled to ``num_layers``.

    Rule: ``l → floor(l·L/32 + 0.5)``, clamped to ``1..L-1``, then bumped to stay strictly
    increasing; 28 layers turn [3, 7, 15, 23] into [3, 6, 13, 20], as the Reroute paper used.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers={num_layers!r} must be an int ≥ 2")
    out: list[int] = []
    for layer in published:
        scaled = min(max(round_half_up(layer * num_layers / _REFERENCE_DEPTH), 1), num_layers - 1)
        if out and scaled <= out[-1]:
            scaled = out[-1] + 1
        if scaled > num_layers - 1:
            raise ValueError(
                f"a {num_layers}-layer decoder is too shallow for {len(published)} decisions in "
                f"1..{num_layers - 1}; pass layers= explicitly"
            )
        out.append(scaled)
    return tuple(out)


@dataclass(frozen=True)
class TokenReduction:
    """Base of every method. Subclasses are frozen dataclasses registered with :func:`register`.

    Class-level rules (read by the torch-free solver): ``key`` (registry name), ``display``,
    ``published_layers`` (decision layers at 32 layers, prune and reroute) and
    :meth:`keep_rule`. Instance settings: a fixed :class:`Schedule`, or a ``target`` budget solved
    per prompt, for each image's token count, when the model is known.

    ``withdraw_at=K`` (keyword, every method): VTW's terminal stage (arXiv 2405.05803) — from layer
    ``K`` on no visual token runs, the same under prune and reroute; ``K`` lies after the last
    decision layer and before the last layer. A ``target`` is then solved with those layers at 0.
    """

    withdraw_at: int | None = field(default=None, kw_only=True)

    if TYPE_CHECKING:
        # Settings every method declares as dataclass fields of its own, in its own positional order;
        # declared here for the type checker only (a field on the base would come first in every
        # subclass's ``__init__``).

        @property
        def reroute(self) -> bool: ...

        @property
        def target(self) -> BudgetTarget | None: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method's own ``__post_init__`` is followed by the shared ``withdraw_at`` check."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_withdraw", False):
            return

        @functools.wraps(own)
        def post_init(self: TokenReduction) -> None:
            own(self)
            self._check_withdraw()

        post_init._checks_withdraw = True  # type: ignore[attr-defined]
        cls.__post_init__ = post_init  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        self._check_withdraw()

    def _check_withdraw(self) -> None:
        """``withdraw_at`` against the decision layers known without a model (all of them once the
        depth is known: :meth:`check_depth`)."""
        if self.withdraw_at is None:
            return
        fixed = self.schedule() if getattr(self, "target", None) is None else None
        layers = fixed.layers if fixed is not None else tuple(getattr(self, "layers", None) or ())
        check_withdraw(type(self).__name__, self.withdraw_at, layers)

    key: ClassVar[str] = ""
    display: ClassVar[str] = ""
    published_layers: ClassVar[dict[bool, tuple[int, ...]]] = {}
    #: True when every stage keeps the same count (the solver moves them together)
    same_count: ClassVar[bool] = False
    #: decisions a prune schedule makes (None: as many as given; FastV prunes once)
    prune_decisions: ClassVar[int | None] = None
    #: False for methods that reuse another's schedule rule (budget tables would repeat its rows)
    tabulated: ClassVar[bool] = True
    #: True for methods that reduce before the language model (Nüwa's stage 1): the first count of
    #: the solver's rule is the ``entry`` of the schedule, the visual tokens entering layer 0
    stage_zero: ClassVar[bool] = False

    # ---- rules for the solver (torch-free) --------------------------------------------------
    @classmethod
    def default_layers(cls, num_layers: int, reroute: bool = False) -> tuple[int, ...]:
        """The published decision layers, scaled to a ``num_layers``-deep decoder."""
        return scale_layers(cls.published_layers[bool(reroute)], num_layers)

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]:
        """Keep counts of every stage (before rounding) from the first stage's count ``a``."""
        raise NotImplementedError

    @classmethod
    def label(cls, reroute: bool) -> str:
        return cls.display + (" + Reroute" if reroute else "")

    @classmethod
    def from_schedule(cls, schedule: Schedule, **settings: Any) -> TokenReduction:
        """The method that runs ``schedule`` with this method's rule and scorer."""
        # the subclasses' own fields (the base declares none of them): called on a registered method
        return cls(layers=schedule.layers, keep=schedule.keep, reroute=schedule.reroute, **settings)  # type: ignore[call-arg]

    # ---- instance ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Display name with the mode, e.g. ``"PDrop + Reroute"``."""
        return self.label(self.reroute)

    def schedule(self) -> Schedule | None:
        """The fixed schedule, or None when keep counts are solved per prompt from ``target``."""
        raise NotImplementedError

    def make_scorer(self) -> Scorer | Selector:
        """The scorer that ranks candidates at each decision, or a selector that chooses the kept set
        itself (DART); a method owns it."""
        raise NotImplementedError

    def bind(self, adapter: ModelAdapter) -> TokenReduction:
        """This method with the defaults of ``adapter``'s model family filled in: default decision layers
        moved to layers the family can score at (:meth:`fit_default_layers`; a no-op on every
        all-attention family)."""
        score_from = ScoreFrom.of(getattr(self, "score_from", ScoreFrom.CURRENT)) or ScoreFrom.CURRENT
        return self.fit_default_layers(len(adapter.layers), adapter.allowed_decision_layers(score_from))

    def fit_default_layers(self, num_layers: int, allowed: Sequence[int]) -> TokenReduction:
        """This method with its depth-dependent default layers placed on ``allowed`` (:func:`fit_layers`).

        Why: on a hybrid decoder (Qwen3.5) only some layers can score a decision, and the published
        layers scaled to the depth mostly miss them, so every method's defaults would be refused. The
        defaults are the library's own mapping of a published schedule onto this model, so mapping
        them once more onto the scoring layers is the same kind of choice; layers the caller gave (and
        fixed default schedules such as ``PDrop()``'s) are taken at their word and refused if not
        allowed. The moved layers are the method's ``layers`` from here on (its repr in the trace, the
        solver's decision layers), so no schedule is substituted silently.
        """
        if self.schedule() is not None or getattr(self, "layers", None) is not None:
            return self
        default = self.default_layers(num_layers, self.reroute)
        fitted = fit_layers(type(self).__name__, default, allowed)
        return self if fitted == default else self.replace(layers=fitted)

    def vision_stage(self, adapter: ModelAdapter) -> VisionStage | None:
        """A stage run while the images are encoded, before the language model (Nüwa), or None."""
        return None

    def replace(self, **changes: Any) -> TokenReduction:
        """A validated copy with ``changes`` (settings are immutable)."""
        return dataclasses.replace(self, **changes)

    def _check_score_from(self, given: ScoreFrom | str) -> None:
        """``score_from`` (the method's field, ``given``) as a string (the public edge) or the enum,
        held as the enum."""
        score_from = ScoreFrom.of(given)
        if score_from is None:
            raise ValueError(
                f"{type(self).__name__}(score_from={given!r}): allowed are 'current' (layer l's "
                "own attention decides layer l, the paper's convention) and 'previous' (layer l-1 decides, "
                "the original FastV convention)"
            )
        object.__setattr__(self, "score_from", score_from)

    def _check_target(self, target: BudgetTarget | None) -> None:
        if target is not None and not isinstance(target, BudgetTarget):
            raise TypeError(
                f"{type(self).__name__}(target={target!r}): give a vlm_reroute.BudgetTarget "
                "(avg_t=, ratio= or flops_fraction=)"
            )

    def _solved_per_prompt(self, owner: str) -> bool:
        """Checks of a method given a ``target``: no ``keep`` beside it, valid ``layers`` and reroute
        flag. True when the keep counts are solved per prompt (the caller's own checks stop there)."""
        if self.target is None:
            return False
        keep = getattr(self, "keep", None)
        if keep is not None:
            raise ValueError(
                f"{owner}(keep={keep!r}, target={self.target!r}): give keep counts or a target to solve "
                "them from, not both"
            )
        object.__setattr__(self, "layers", check_layer_list(owner, getattr(self, "layers", None)))
        Schedule.of([1], [1], self.reroute, owner=owner)  # checks the reroute flag
        return True

    def keep_counts(self, num_layers: int, shape: Any) -> Callable[[int], tuple[int, ...]]:
        """Per-image keep counts as a function of the image's visual tokens, for one model."""
        fixed = self.schedule()
        if fixed is not None:
            return fixed.counts
        from ..budget.solver import solve_for_target  # torch-free

        # the class as the solver's ``method: str | type`` (hashable: its cache key)
        cls: type = type(self)
        target, reroute, layers = self.target, self.reroute, self.layers_for(num_layers)
        withdraw_at = self.withdraw_at

        def solved(n_visual: int) -> tuple[int, ...]:
            return solve_for_target(shape, n_visual, cls, reroute, target, layers, 0, withdraw_at).keep

        return solved

    def resolve(self, shape: Any, n_visual: int) -> Schedule:
        """The schedule with integer counts this method runs on ``shape`` (a
        :class:`~vlm_reroute.budget.ModelShape`) for an image of ``n_visual`` tokens."""
        layers = self.check_depth(shape.num_layers)
        keep = self.keep_counts(shape.num_layers, shape)(n_visual)
        return Schedule(layers, keep, self.reroute, owner=self.name, withdraw_at=self.withdraw_at)

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """Decision layers on a ``num_layers``-deep decoder."""
        fixed = self.schedule()
        if fixed is not None:
            return fixed.layers
        explicit = getattr(self, "layers", None)
        return tuple(explicit) if explicit else self.default_layers(num_layers, self.reroute)

    def check_depth(self, num_layers: int) -> tuple[int, ...]:
        """The decision layers on a ``num_layers``-deep decoder, checked to lie in ``1 .. L-1``, and
        ``withdraw_at`` after the last of them."""
        layers = self.layers_for(num_layers)
        owner = type(self).__name__
        Schedule.of(layers, [1] * len(layers), True, owner=owner).check_depth(num_layers)
        check_withdraw(owner, self.withdraw_at, layers, num_layers)
        return layers

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[Trace]:
        """Route ``model`` inside the block; always remove every hook on exit.

        The settings are checked again here, so none forced past the freeze reaches the executor.
        ``torch.compile(model)`` is unwrapped (the hooks go on the model it wraps); a model
        compiled in place is refused (see ``engine/compiled.py``).
        """
        from ..adapters import adapter_for
        from ..budget.shapes import ModelShape
        from ..engine.compat import check_version
        from ..engine.compiled import refuse_compiled_in_place, unwrap
        from ..engine.executor import RoutingExecutor
        from ..engine.plan import Plan
        from ..engine.trace import Trace

        check_version()
        model = unwrap(model)
        refuse_compiled_in_place(model)
        method = dataclasses.replace(self)  # checked again: no setting forced past the freeze gets through
        adapter = adapter_for(model)
        method = method.bind(adapter)
        num_layers = len(adapter.layers)
        layers = method.check_depth(num_layers)
        shape = ModelShape.from_config(model.config) if method.schedule() is None else None
        if model in _ACTIVE:
            raise RuntimeError(f"{type(model).__name__} already has a vlm-reroute method applied; nest none")
        trace = Trace(method=repr(method))
        plan = Plan(
            method=method.name,
            layers=layers,
            reroute=method.reroute,
            keep_counts=method.keep_counts(num_layers, shape),
            scorer=method.make_scorer(),
            vision=method.vision_stage(adapter),
            withdraw_at=method.withdraw_at,
        )
        executor = RoutingExecutor(model, adapter, plan, trace)
        _ACTIVE.add(model)
        try:
            executor.install()
            yield trace
        finally:
            executor.remove()
            _ACTIVE.discard(model)


class LayerKeepMethod(TokenReduction):
    """A method set by decision ``layers`` and a ``keep`` entry per decision (PDrop, SparseVLM, DART):
    the one :meth:`schedule` they share.

    ``layers`` may stay None without a ``target`` when the method has fixed counts but depth-dependent
    default layers (SparseVLM's release tier, DART's default): the schedule is then known once the
    depth is (:meth:`keep_counts`), and :meth:`~TokenReduction.bind` may move those layers.
    """

    if TYPE_CHECKING:  # the subclasses' own dataclass fields, in their own positional order
        layers: Sequence[int] | None
        keep: Any

    def stage_keep(self, layers: Sequence[int]) -> tuple[Keep, ...]:
        """The keep entry of every decision of ``layers``: ``keep`` as given (DART repeats one entry)."""
        return tuple(self.keep)

    def schedule(self) -> Schedule | None:
        """The fixed schedule, or None when the counts are solved from ``target`` or the layers depend
        on the depth (no ``layers`` given)."""
        if self.target is not None or self.layers is None:
            return None
        return Schedule.of(self.layers, self.stage_keep(self.layers), self.reroute, owner=type(self).__name__)

    def keep_counts(self, num_layers: int, shape: Any) -> Callable[[int], tuple[int, ...]]:
        if self.target is not None or self.layers is not None:
            return super().keep_counts(num_layers, shape)
        layers = self.default_layers(num_layers, self.reroute)
        return Schedule.of(layers, self.stage_keep(layers), self.reroute, owner=type(self).__name__).counts


def fit_layers(owner: str, default: Sequence[int], allowed: Sequence[int]) -> tuple[int, ...]:
    """Each of the ``default`` decision layers moved to the first ``allowed`` layer at or after it and
    after the previous moved one (the decision count stays; nothing moves where all are allowed).

    Later, not earlier: the layers before a published decision then still see every token, so the
    moved schedule is never cheaper than the published one in those layers (a target is solved on
    the moved layers). A default with no allowed layer left is a ``ValueError`` naming both lists.
    """
    placed = place_layers(default, allowed)
    if None in placed:
        raise ValueError(
            f"{owner}: the default decision layers {list(default)} cannot each move to a later "
            f"allowed decision layer of this model (allowed: {list(allowed)}); give layers= explicitly"
        )
    return tuple(a for a in placed if a is not None)


def place_layers(default: Sequence[int], allowed: Sequence[int]) -> list[int | None]:
    """Per ``default`` layer, the first ``allowed`` layer at or after it and after the last one placed,
    or None where none is left (:func:`fit_layers` refuses that; pass-through decisions drop it)."""
    out: list[int | None] = []
    last = -1
    for layer in default:
        at = min((a for a in allowed if a >= layer and a > last), default=None)
        out.append(at)
        last = last if at is None else at
    return out


def check_layer_list(owner: str, layers: Sequence[int] | None) -> tuple[int, ...] | None:
    """Explicit decision layers for a target-solved method: validated like any schedule's."""
    if layers is None:
        return None
    layers = tuple(layers)
    Schedule.of(layers, [1] * len(layers), True, owner=owner)
    return layers


def keep_tuple(keep: Sequence[Keep] | Keep) -> tuple[Keep, ...]:
    return tuple(keep) if isinstance(keep, Sequence) and not isinstance(keep, str) else (keep,)
