"""Stage-1 methods: a reduction before the language model, composed with any in-decoder method.

VisionZip (arXiv 2412.04467), DivPrune (arXiv 2503.02175) and Nüwa's stage 1 (arXiv 2602.02951)
decide, while the images are encoded or at the input of decoder layer 0, which visual tokens enter
the language model at all (``methods.md`` §4). The engine runs that decision as an irreversible
stage 0 (``engine/vision.py``); the tokens that enter keep their **original position ids** (Qwen:
their original 3-axis M-RoPE ids), whereas the VisionZip and DivPrune references compact positions
(Nüwa's "PERC"): a deliberate deviation (``methods.md`` §2, "Positions"; ``docs/methods.md``).

**One composition rule.** ``Stage1 + InDecoder`` (e.g. ``VisionZip() + PDrop(reroute=True)``, spec
string ``visionzip+pdrop``) runs the stage-1 method, then the in-decoder method on the tokens that
entered: its decision layers, its scorer, prune or reroute, and its keep counts taken of the entering
tokens (a fraction ``f`` keeps ``max(1, int(K₁·f))``; a budget target is solved for an "image" of
``K₁`` tokens, which is the whole pipeline's avg_T because stage 1 acts before layer 0). Nüwa's stage
1 composes the same way (``Nuwa(k1=...) + FastV(...)`` replaces its stage 2).

Alone, a stage-1 method keeps what entered through the decoder: its registered schedule rule is the
entry ``a`` followed by ``a`` at each decision (one pass-through decision at the middle layer, or four
under reroute, as Nüwa's stage 2: the budget solver needs one decision layer, and a decision that keeps
every candidate computes nothing different; on a hybrid decoder binding moves them to layers that can
score, dropping any that find none: :func:`fit_pass_through`). ``keep=`` makes those decisions cut
(Nüwa-style).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..budget.rules import round_half_up
from ..budget.schedule import Keep, Schedule, check_keep_value, resolve_keep
from ..budget.target import BudgetTarget
from .base import TokenReduction, check_layer_list, place_layers, scale_layers

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter
    from ..scoring.base import Scorer, Selector

__all__ = [
    "PASS_DECISIONS",
    "Stage1Method",
    "build_composite",
    "check_then",
    "composite_label",
    "entry_count",
    "fit_pass_through",
    "parse_composite",
    "pass_through_layers",
]

PASS_DECISIONS = 4  # decisions of the reroute form (as Nüwa + Reroute and FastV / PDrop + Reroute)
STAGE1_KEYS = ("visionzip", "divprune", "nuwa")  # registry keys that may open a composed spec


def pass_through_layers(num_layers: int, reroute: bool) -> tuple[int, ...]:
    """Layer 16 of 32 scaled to the depth; reroute: four decisions spread evenly from there."""
    first = scale_layers((16,), num_layers)[0]
    if not reroute:
        return (first,)
    span = num_layers - first
    return tuple(sorted({first + round_half_up(i * span / PASS_DECISIONS) for i in range(PASS_DECISIONS)}))


def entry_count(owner: str, k: Keep, n: int) -> int:
    """Tokens of an image of ``n`` that enter: an int ``k`` (at most ``n``) or ``round(n·f)`` (≥ 1)."""
    if isinstance(k, float):
        return min(n, max(1, round_half_up(n * k)))
    if k > n:
        raise ValueError(
            f"{owner}: {k} tokens per image enter the language model, but an image here has {n}; give at "
            f"most {n} (or a fraction of the image, e.g. k=0.25)"
        )
    return k


def check_then(owner: str, then: Any, given: dict[str, Any]) -> None:
    """``then=``: one in-decoder method, and no in-decoder setting of the stage-1 method beside it."""
    if not isinstance(then, TokenReduction) or type(then).stage_zero:
        raise TypeError(
            f"{owner}(then={then!r}): the method after stage 1 is an in-decoder method (FastV, PDrop, "
            "Random, ...), not a stage-1 method; one stage 1 per pipeline"
        )
    clash = [name for name, value in given.items() if value is not None]
    if clash:
        raise ValueError(
            f"{owner}(then={type(then).__name__}(...), {clash[0]}=...): the in-decoder method decides "
            f"{', '.join(clash)}; give them to it"
        )


def split_spec(name: str) -> tuple[str, str] | None:
    """``"visionzip+pdrop+reroute"`` → ``("visionzip", "pdrop+reroute")``; None when not composed."""
    text = str(name).strip().lower().replace(" ", "")
    first, plus, rest = text.partition("+")
    if not plus or first not in STAGE1_KEYS or rest in ("", "reroute"):
        return None
    return first, rest


def parse_composite(name: str, reroute: bool = False) -> tuple[str, bool] | None:
    """``"visionzip+pdrop+reroute"`` → ``("visionzip+pdrop", True)``: the spec key of a composed method
    and its mode (the in-decoder method's), or None when ``name`` is not composed."""
    parts = split_spec(name)
    if parts is None:
        return None
    from .registry import method_class

    first, rest = parts
    decoder, reroute = method_class(rest, reroute)
    if decoder.stage_zero:
        raise ValueError(
            f"method={name!r}: a stage-1 method ({first}) is followed by an in-decoder method, not by "
            f"another stage-1 method ({decoder.key})"
        )
    return f"{first}+{decoder.key}", reroute


def composite_label(key: str, reroute: bool) -> str:
    """``VisionZip + PDrop + Reroute`` for the spec key ``visionzip+pdrop``."""
    from .registry import method_class

    first, rest = key.split("+", 1)
    return f"{method_class(first)[0].display} + {method_class(rest)[0].label(reroute)}"


def build_composite(spec: Any, model: Any = None) -> TokenReduction:
    """The method of a composed spec: the budget, schedule and mode go to the in-decoder method (its
    counts are taken of the tokens that enter), the settings to the stage-1 method."""
    from .registry import method_class

    first, rest = spec.key.split("+", 1)
    decoder = dataclasses.replace(spec, key=rest, settings=()).build()
    method = method_class(first)[0](**dict(spec.settings)) + decoder
    if model is not None:
        from ..adapters import adapter_for

        method.check_depth(len(adapter_for(model).layers))
    return method


class _MethodDataclass(Protocol):
    """What :class:`Composable` uses of the frozen method dataclass it is mixed into."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    display: ClassVar[str]

    @property
    def reroute(self) -> bool: ...

    def label(self, reroute: bool) -> str: ...


class Composable:
    """``Stage1 + InDecoder`` for every stage-1 method (VisionZip, DivPrune, Nüwa): this method's
    stage 1, then ``other`` on the tokens that entered (held as ``then``; the mode is ``other``'s)."""

    def __add__(self: _MethodDataclass, other: Any) -> Any:
        if not isinstance(other, TokenReduction):
            return NotImplemented
        return dataclasses.replace(self, then=other, reroute=other.reroute, withdraw_at=other.withdraw_at)

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, TokenReduction):
            raise TypeError(
                f"{type(other).__name__}(...) + {type(self).__name__}(...): the stage-1 method comes first "
                f"({type(self).__name__}(...) + {type(other).__name__}(...)), it acts before the decoder"
            )
        return NotImplemented

    @property
    def name(self: _MethodDataclass) -> str:
        then = getattr(self, "then", None)
        return f"{self.display} + {then.name}" if then is not None else self.label(self.reroute)


@dataclass(frozen=True)
class Stage1Method(Composable, TokenReduction):
    """Base of VisionZip and DivPrune: ``k`` tokens per image enter (int, or fraction of the image),
    then the in-decoder part: ``then`` (an in-decoder method) or this method's own pass-through
    decisions (``layers``, ``keep`` of the entering tokens, default all; ``scorer``), or a ``target``
    solved per image. ``reroute``: the in-decoder decisions route instead of removing."""

    stage_zero: ClassVar[bool] = True
    same_count: ClassVar[bool] = True
    #: no rows in the budget tables: alone, every layer carries the entry (avg_T = the count that enters)
    tabulated: ClassVar[bool] = False

    k: Keep | None = None
    layers: Sequence[int] | None = None
    keep: Sequence[Keep] | None = None
    reroute: bool = False
    scorer: Scorer | None = None
    target: BudgetTarget | None = None
    then: TokenReduction | None = None
    depth: int | None = field(default=None, init=False, compare=False, repr=False)

    def _check_common(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.reroute, bool):
            raise TypeError(f"{owner}(reroute={self.reroute!r}): True or False")
        self._check_target(self.target)
        if self.k is not None:
            check_keep_value(owner, self.k)
        if self.then is not None:
            check_then(owner, self.then, {"layers": self.layers, "keep": self.keep, "target": self.target})
            if self.reroute != self.then.reroute:
                raise ValueError(f"{owner}(reroute={self.reroute}): the in-decoder method's mode decides")
            return
        if self.target is not None and (self.k is not None or self.keep is not None):
            raise ValueError(
                f"{owner}(target={self.target!r}): give a target or counts (k=, keep=), not both"
            )
        object.__setattr__(self, "layers", check_layer_list(owner, self.layers))
        if self.keep is not None:
            keep = tuple(self.keep) if isinstance(self.keep, Sequence) else (self.keep,)
            if self.layers is None:
                raise ValueError(f"{owner}(keep={list(keep)!r}): give the decision layers too (layers=)")
            Schedule.of(self.layers, keep, self.reroute, owner=owner)
            object.__setattr__(self, "keep", keep)

    # ---- rules for the solver (torch-free) --------------------------------------------------
    @classmethod
    def default_layers(cls, num_layers: int, reroute: bool = False) -> tuple[int, ...]:
        return pass_through_layers(num_layers, reroute)

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]:
        """``a`` tokens enter (the entry), and every decision keeps them all."""
        return [a] * num_stages

    @classmethod
    def from_schedule(cls, schedule: Schedule, **settings: Any) -> Stage1Method:
        """Entry = ``k`` (none: every token enters), the decisions and their keep."""
        k = 1.0 if schedule.entry is None else schedule.entry
        return cls(k=k, layers=schedule.layers, keep=schedule.keep, reroute=schedule.reroute, **settings)

    # ---- what a subclass says -------------------------------------------------------------------
    def entry_setting(self) -> Keep:
        """The tokens per image that enter when no target is given (``k``, or the method's default)."""
        raise NotImplementedError

    def stage(self, adapter: ModelAdapter, plan: Callable[[int], tuple[int, tuple[int, ...]]]) -> Any:
        """The engine's vision stage for ``adapter``'s model, planning each image with ``plan``."""
        raise NotImplementedError

    # ---- schedule -----------------------------------------------------------------------------------
    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        if self.then is not None:
            return self.then.layers_for(num_layers)
        return tuple(self.layers) if self.layers else self.default_layers(num_layers, self.reroute)

    def schedule(self) -> Schedule | None:
        """The fixed schedule (entry and decisions) on the bound depth (else 32), or None when the
        counts depend on the image (a fraction ``k``, a target)."""
        entry = None if self.target is not None else self.entry_setting()
        if not isinstance(entry, int):
            return None
        if self.then is not None:
            inner = self.then.schedule()
            if inner is None:
                return None
            return Schedule(inner.layers, inner.keep, inner.reroute, owner=self.name, entry=entry)
        layers = self.layers_for(self.depth or 32)
        keep = self.keep or (1.0,) * len(layers)
        return Schedule(tuple(layers), tuple(keep), self.reroute, owner=self.name, entry=entry)

    def image_plan(self, n: int, shape: Any, num_layers: int) -> tuple[int, tuple[int, ...]]:
        """``(K₁, counts of each later decision)`` for an image of ``n`` tokens."""
        owner = type(self).__name__
        if self.target is not None:
            solved = TokenReduction.keep_counts(self, num_layers, shape)(n)
            return solved[0], tuple(solved[1:])
        k1 = entry_count(owner, self.entry_setting(), n)
        if self.then is not None:
            return k1, tuple(self.then.keep_counts(num_layers, shape)(k1))
        keep = self.keep or (1.0,) * len(self.layers_for(num_layers))
        return k1, tuple(resolve_keep(owner, k, k1) for k in keep)

    def keep_counts(self, num_layers: int, shape: Any) -> Callable[[int], tuple[int, ...]]:
        """In-decoder counts per image size (the engine takes each image's from its stage 1)."""
        return lambda n: self.image_plan(n, shape, num_layers)[1]

    def resolve(self, shape: Any, n_visual: int) -> Schedule:
        layers = self.check_depth(shape.num_layers)
        k1, counts = self.image_plan(n_visual, shape, shape.num_layers)
        return Schedule(layers, counts, self.reroute, owner=self.name, entry=k1)

    def make_scorer(self) -> Scorer | Selector:
        """The in-decoder method's scorer; alone, a given ``scorer``, else last-token attention for
        decisions that cut (``keep=``) and no ranking at all for pass-through decisions (they keep
        every candidate: :class:`~vlm_reroute.scoring.pass_through.PassThrough`)."""
        if self.then is not None:
            return self.then.make_scorer()
        if self.scorer is not None:
            return self.scorer
        if self.keep is None:
            from ..scoring.pass_through import PassThrough

            return PassThrough()
        from ..scoring.attention import LastTokenAttention

        return LastTokenAttention()

    # ---- binding --------------------------------------------------------------------------------
    def bind(self, adapter: ModelAdapter) -> Stage1Method:
        """This method for ``adapter``'s model: ``then`` bound (its own defaults fitted), or this method's
        pass-through decisions fitted to the layers the family can score at (``TokenReduction.bind``),
        the depth recorded, and a tower that cannot serve refused now."""
        then = None if self.then is None else self.then.bind(adapter)
        fitted = self if then is not None else super().bind(adapter)  # fit_default_layers, below
        assert isinstance(fitted, Stage1Method)  # this method, fitted (a copy, never another class)
        bound = dataclasses.replace(fitted, then=then)  # a copy: the depth is set on it, not on self
        object.__setattr__(bound, "depth", len(adapter.layers))
        bound.stage(adapter, lambda n: (n, ()))  # refuses a model whose tower cannot serve, now
        return bound

    def fit_default_layers(self, num_layers: int, allowed: Sequence[int]) -> Stage1Method:
        """This method with its default pass-through decisions placed on ``allowed`` (alone, no ``then``).

        Why its own rule: the base rule leaves a fixed schedule alone, and a stage-1 method's schedule is
        fixed whenever its entry is an int (``VisionZip()``) although its layers are only the default;
        and the base rule keeps every decision, which a hybrid decoder may not have room for (four reroute
        decisions after the middle of a 24-layer Qwen3.5 leave three full-attention layers). A
        pass-through decision keeps every candidate, so one that finds no allowed layer is dropped
        (:func:`fit_pass_through`); layers the caller gave (and ``keep=``, which needs them) stay as given.
        """
        if self.then is not None or self.layers is not None:
            return self
        default = self.default_layers(num_layers, self.reroute)
        fitted = fit_pass_through(type(self).__name__, default, allowed)
        return self if fitted == default else dataclasses.replace(self, layers=fitted)

    def vision_stage(self, adapter: ModelAdapter) -> Any:
        from ..budget.shapes import ModelShape

        shape = ModelShape.from_config(adapter.model.config)
        depth = len(adapter.layers)
        return self.stage(adapter, lambda n: self.image_plan(n, shape, depth))


def fit_pass_through(owner: str, default: Sequence[int], allowed: Sequence[int]) -> tuple[int, ...]:
    """The base rule (:func:`~.base.fit_layers`: each default to the first allowed layer at or after it
    and after the previous one) for decisions that keep every candidate: a decision with no allowed
    layer left is dropped instead of refused, as it computes nothing; none placed is a ``ValueError``."""
    out = tuple(a for a in place_layers(default, allowed) if a is not None)
    if not out:
        raise ValueError(
            f"{owner}: no allowed decision layer of this model lies at or after the default pass-through "
            f"layer {default[0]} (allowed: {list(allowed)}); give layers= explicitly"
        )
    return out


def kept_mask(n: int, kept: Any) -> Any:
    """Bool ``(n,)`` with ``kept`` (long indices) set."""
    import torch

    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept.cpu()] = True
    return mask


def side_of(n: int) -> tuple[int, int]:
    """A square grid of ``n`` tokens when ``n`` is a square, else one row (layer-0 rows carry no grid)."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)
