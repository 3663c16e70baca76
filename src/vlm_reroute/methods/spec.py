"""One method request, parsed and checked in one place, built by one function: :class:`MethodSpec`.

Every entry point asks for a method the same way — a registry key, prune or reroute, one budget or an
explicit schedule, and the method's own settings — and gives it in its own spelling: option values
(``vlm-reroute run --method pdrop --reroute --tier 64``), keywords (``method_from_spec("pdrop+reroute",
tier=64)``, ``vlm_reroute.pipeline(..., ratio=0.111)``) or lmms-eval's ``--model_args`` strings
(``method=pdrop,reroute=true,tier=64``). Each spelling has one constructor here
(:meth:`MethodSpec.from_options`, :meth:`MethodSpec.parse`, :meth:`MethodSpec.from_args`); they all
end in the same frozen value, checked by the same code, and :meth:`MethodSpec.build` turns it into a
method. A new setting lands here and nowhere else. Torch-free (the budget command, the eval grid and
the lmms-eval manifest read specs without importing torch).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..budget.schedule import Keep, Schedule
from ..budget.target import BudgetTarget
from .registry import method_class, method_names
from .spec_parsing import (
    DEFAULT_RATIO,
    VANILLA,
    option_budget,
    option_keep,
    option_layers,
    option_settings,
    option_withdraw,
    parse_bool,
    parse_layer,
    parse_list,
    parse_number,
)
from .stage1 import build_composite, composite_label, parse_composite

if TYPE_CHECKING:
    from .base import TokenReduction

__all__ = [
    "DEFAULT_RATIO",
    "VANILLA",
    "MethodSpec",
    "describe_budget",
    "parse_bool",
    "parse_list",
    "parse_number",
]

#: the budget fields as the public keywords spell them (``avg_t`` is ``tier=`` at every edge)
_KEYWORD = {"avg_t": "tier", "ratio": "ratio", "flops_fraction": "flops_fraction"}
_DESCRIBED = {"tier": "avg_T", "ratio": "ratio", "flops_fraction": "FLOPs fraction"}


def describe_budget(budget: Mapping[str, float]) -> str:
    """``avg_T = 64`` for the keyword-spelled budget ``{"tier": 64}`` (``{}``: explicit keep counts)."""
    if not budget:
        return "explicit keep counts"
    ((name, value),) = budget.items()
    return f"{_DESCRIBED[name]} = {value:g}"


@dataclass(frozen=True)
class MethodSpec:
    """What to run: a registered method, its mode, its budget or schedule, and its settings.

    Attributes
    ----------
    key
        Registry key (``"fastv"``, ``"pdrop"``, ``"random"``, ``"nuwa"``; :func:`method_names`), or
        ``"none"`` for vanilla (no method: :meth:`build` returns ``None``).
    reroute
        Recoverable routing (``True``) or removal for good (``False``).
    avg_t, ratio, flops_fraction
        At most one budget, solved per prompt for each image's token count: ``avg_t`` visual tokens per
        decoder layer on average, ``ratio`` of each image's visual tokens kept on average, or
        ``flops_fraction`` of the decoder's prefill FLOPs. ``strict``: an unreachable budget is an error
        instead of the nearest reachable one with a warning.
    layers, keep
        An explicit schedule (``keep``: counts, or fractions of each image's tokens), or with a budget
        ``layers`` alone: the decision layers the budget is solved on.
    settings
        The method class's own keywords (``seed=`` for ``random``, ``score_from=``, Nüwa's ...), held as
        sorted ``(name, value)`` pairs so that the spec stays a hashable value; a mapping is accepted.
    withdraw_at
        VTW (arXiv 2405.05803): no visual token runs from this decoder layer on, under prune and
        reroute alike; after the last decision layer, before the last layer (checked by the method).

    Names of avg_T. The quantity is ``avg_t`` inside the package (this field,
    :class:`~vlm_reroute.budget.BudgetTarget`, the solver's ``solve_schedule(avg_t=)``). The edges keep
    the spelling people type: ``--tier`` on the command line, ``tier=`` as a keyword of
    :func:`~vlm_reroute.methods.method_from_spec`, :func:`vlm_reroute.pipeline` and :meth:`parse`, and in
    lmms-eval's ``--model_args``; the ``tier`` of JSON reports, of the eval grid's ``results.json`` and
    of the published tables (192 / 128 / 64) is the same number. Error messages name the keyword
    spelling (``tier=64``), except those of :meth:`from_options`, which name the options (``--tier 64``).
    """

    key: str = VANILLA
    reroute: bool = False
    avg_t: float | None = None
    ratio: float | None = None
    flops_fraction: float | None = None
    layers: tuple[int, ...] | None = None
    keep: tuple[Keep, ...] | None = None
    strict: bool = False
    settings: tuple[tuple[str, Any], ...] = ()
    withdraw_at: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "keep"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str | tuple):
                object.__setattr__(self, name, tuple(value))
        settings = self.settings.items() if isinstance(self.settings, Mapping) else self.settings
        object.__setattr__(self, "settings", tuple(sorted(settings)))
        if self.key == VANILLA:
            fields = (*_KEYWORD, "layers", "keep", "withdraw_at")
            extra = [_KEYWORD.get(k, k) for k in fields if getattr(self, k) is not None]
            extra += ["strict"] * self.strict + [k for k, _ in self.settings]
            if self.reroute or extra:
                raise ValueError(
                    f"method=none (vanilla) takes no {', '.join(extra) or 'reroute'}; "
                    f"name a method ({', '.join(method_names())}) to reduce tokens"
                )
            return
        composite = parse_composite(self.key, self.reroute)  # "visionzip+pdrop": stage 1 + decoder
        if composite is not None:
            object.__setattr__(self, "key", composite[0])
            object.__setattr__(self, "reroute", composite[1])
        elif self.key not in method_names():
            raise ValueError(f"method={self.key!r}: allowed are none, {', '.join(method_names())}")
        self._check_combination()
        self._check_settings()
        self.build()  # the method's own checks (ranges, schedules), without a model

    def _check_combination(self) -> None:
        """One budget, or keep with its layers; messages in the keyword spelling (``tier=64``)."""
        given = self.budget()
        if len(given) > 1:
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: give one budget, not several"
            )
        if given and self.keep is not None:
            ((what, value),) = given.items()
            raise ValueError(
                f"{what}={value!r} with keep={list(self.keep)!r}: give a budget to solve the keep counts "
                "from, or explicit keep counts, not both"
            )
        if self.keep is not None and self.layers is None:
            raise ValueError(f"keep={list(self.keep)!r} without layers: give the decision layers too")
        if not given and self.keep is None and self.layers is not None:
            raise ValueError(
                f"layers={list(self.layers)!r} without keep or a budget: give keep= or tier=/ratio="
            )

    # ---- the edges ------------------------------------------------------------------------------
    @classmethod
    def parse(
        cls,
        method: str,
        *,
        reroute: bool = False,
        tier: float | None = None,
        ratio: float | None = None,
        flops_fraction: float | None = None,
        strict: bool = False,
        layers: Sequence[int] | None = None,
        keep: Sequence[Keep] | None = None,
        withdraw_at: int | None = None,
        **settings: Any,
    ) -> MethodSpec:
        """From keywords: ``parse("pdrop+reroute", tier=64)``, ``parse("random", ratio=0.2, seed=3)``.

        ``method`` is a key or a display name, optionally with ``+ reroute`` (``"FastV + Reroute"``,
        ``"pdrop_reroute"``), which sets ``reroute``; ``tier`` is avg_T.
        """
        composite = parse_composite(method, reroute)  # "visionzip+pdrop": stage 1 + an in-decoder method
        if composite is not None:
            key, reroute = composite
        else:
            rule, reroute = method_class(method, reroute)
            key = rule.key
        return cls(key, reroute, tier, ratio, flops_fraction, layers, keep, strict, settings, withdraw_at)  # type: ignore[arg-type]

    @classmethod
    def from_args(
        cls,
        method: Any = VANILLA,
        reroute: Any = False,
        tier: Any = None,
        ratio: Any = None,
        flops_fraction: Any = None,
        layers: Any = None,
        keep: Any = None,
        withdraw_at: Any = None,
    ) -> MethodSpec:
        """From lmms-eval's ``--model_args`` values (strings, numbers, bools; lists as ``[2,7]`` or
        ``2;7``); ``method=none`` (or ``vanilla``) is vanilla."""
        name = VANILLA if method is None else str(method).strip().lower()
        return cls(
            VANILLA if name == "vanilla" else name,
            reroute=parse_bool(reroute, "reroute"),
            avg_t=parse_number(tier, "tier"),
            ratio=parse_number(ratio, "ratio"),
            flops_fraction=parse_number(flops_fraction, "flops_fraction"),
            layers=parse_list(layers, "layers", integer=True),  # type: ignore[arg-type]
            keep=parse_list(keep, "keep", integer=False),
            withdraw_at=parse_layer(withdraw_at, "withdraw_at"),
        )

    @classmethod
    def from_options(
        cls,
        method: str,
        reroute: bool = False,
        *,
        tier: float | None = None,
        ratio: float | None = None,
        flops_fraction: float | None = None,
        strict: bool = False,
        layers: str | None = None,
        keep: str | None = None,
        withdraw_at: int | None = None,
        settings: Sequence[str] | None = None,
    ) -> MethodSpec:
        """From the command line's option values (``--layers 2,7 --keep 46,23``, ``--tier 64``,
        ``--set k=0.25``); with neither a budget nor ``--keep`` the budget is ``ratio`` =
        :data:`DEFAULT_RATIO`. Errors name the options (``--tier 64 with --keep: ...``)."""
        layer_list, keep_list = option_layers(layers), option_keep(keep)
        if keep_list is not None and layer_list is None:
            raise ValueError("--keep needs --layers (the decision layers its counts apply to)")
        given = option_settings(settings)
        # a stage-1 method alone given its entering count (``--set k=12``) needs no default budget
        counted = bool({"k", "k1"} & set(given)) and _stage_zero(method)
        explicit = keep_list is not None or counted
        budget = option_budget(tier, ratio, flops_fraction, strict, explicit_keep=explicit)
        return cls.parse(
            method, reroute=reroute, strict=strict, layers=layer_list, keep=keep_list,
            withdraw_at=option_withdraw(withdraw_at), **budget, **given,
        )  # fmt: skip

    def _check_settings(self) -> None:
        """Every setting is one the method takes (a composed method's go to its stage-1 method); one
        error listing them otherwise. The list leaves out what has an option of its own (budget,
        layers, keep, mode, VTW) and objects (``scorer``, ``then``)."""
        if not self.settings:
            return
        cls: Any = method_class(self.key.split("+", 1)[0])[0]
        params = inspect.signature(cls).parameters
        unknown = [name for name, _ in self.settings if name not in params]
        if unknown:
            own = {"reroute", "target", "layers", "keep", "then", "scorer", "withdraw_at"}
            allowed = ", ".join(n for n in params if n not in own) or "none"
            raise ValueError(
                f"setting {', '.join(unknown)}: {cls.display} has no such setting; allowed: {allowed}"
            )

    # ---- the method -----------------------------------------------------------------------------
    def build(self, model: Any = None) -> TokenReduction | None:
        """The method (``None`` for vanilla); ``model`` (optional) is checked now, not at the first call.

        With a budget the keep counts are solved per prompt, for each image's token count, on the
        decision layers ``layers`` (default: the method's published layers scaled to the model's depth).
        """
        if self.key == VANILLA:
            return None
        if "+" in self.key:  # a stage-1 method composed with an in-decoder one (methods/stage1.py)
            return build_composite(self, model)
        cls: Any = method_class(self.key)[0]  # a registered TokenReduction subclass
        settings = dict(self.settings)
        if self.withdraw_at is not None:  # VTW: a keyword of every method (methods/base.py)
            settings["withdraw_at"] = self.withdraw_at
        if self.budget():
            target = BudgetTarget(
                avg_t=self.avg_t, ratio=self.ratio, flops_fraction=self.flops_fraction, strict=self.strict
            )
            method = cls(reroute=self.reroute, target=target, layers=self.layers, **settings)
        elif self.keep is not None:
            layers = self.layers or ()  # never empty here: keep without layers is refused on construction
            schedule = Schedule.of(layers, self.keep, self.reroute, owner=cls.__name__)
            method = cls.from_schedule(schedule, **settings)
        else:
            method = cls(reroute=self.reroute, **settings)
        if model is not None:
            from ..adapters import adapter_for

            method.check_depth(len(adapter_for(model).layers))
        return method

    def replace(self, **changes: Any) -> MethodSpec:
        """A checked copy with ``changes`` (field names: ``key``, ``reroute``, ``avg_t``, ...)."""
        return dataclasses.replace(self, **changes)

    # ---- how it reads -----------------------------------------------------------------------------
    def budget(self) -> dict[str, float]:
        """The budget given, keyword-spelled (``{"tier": 64}``, ``{"ratio": 0.111}``; ``{}`` without one):
        the ``budget`` of the command line's JSON reports."""
        return {_KEYWORD[k]: getattr(self, k) for k in _KEYWORD if getattr(self, k) is not None}

    def describe_budget(self) -> str:
        """``avg_T = 64``, ``ratio = 0.111``, ``FLOPs fraction = 0.25``, or what else decides the counts."""
        if self.budget() or self.keep is not None:
            return describe_budget(self.budget())
        return "the method's defaults"

    @property
    def name(self) -> str:
        """``vanilla``, ``FastV``, ``PDrop + Reroute``...: the built method's ``name``."""
        if self.key == VANILLA:
            return "vanilla"
        if "+" in self.key:
            return composite_label(self.key, self.reroute)
        cls, reroute = method_class(self.key, self.reroute)
        return cls.label(reroute)

    @property
    def label(self) -> str:
        """The name with its budget (and ``withdraw_at``): ``FastV + Reroute @ avg_T 64``."""
        if self.key == VANILLA:
            return "vanilla"
        budget = self.budget()
        withdraw = "" if self.withdraw_at is None else f", withdraw_at={self.withdraw_at}"
        if budget:
            ((name, value),) = budget.items()
            return f"{self.name} @ {_DESCRIBED[name]} {value:g}{withdraw}"
        if self.keep is not None:
            return f"{self.name} layers={list(self.layers or ())} keep={list(self.keep)}{withdraw}"
        return f"{self.name} (defaults{withdraw})"

    def model_args(self) -> str:
        """The lmms-eval ``--model_args`` fragment that reproduces this spec (settings have no spelling
        there: the plugin takes none)."""
        parts = [f"method={self.key}"]
        if self.key != VANILLA:
            parts.append(f"reroute={str(self.reroute).lower()}")
        parts += [f"{k}={v:g}" for k, v in self.budget().items()]
        for k in ("layers", "keep"):
            if getattr(self, k) is not None:
                values = (f"{v:g}" if isinstance(v, float) else str(v) for v in getattr(self, k))
                parts.append(f"{k}=[{','.join(values)}]")
        if self.withdraw_at is not None:
            parts.append(f"withdraw_at={self.withdraw_at}")
        return ",".join(parts)


def _stage_zero(method: str) -> bool:
    """Whether ``method`` names a stage-1 method alone (``divprune``, ``divprune+reroute``); a composed
    spec (``visionzip+pdrop``) or an unknown name: False (parsing reads or names it)."""
    try:
        return bool(method_class(method)[0].stage_zero)
    except ValueError:
        return False
