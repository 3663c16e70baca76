"""The registry of methods: one place that maps a name to its class (no name strings elsewhere).

``method_from_spec("pdrop", reroute=True, tier=64)`` builds a method from strings and numbers through
:class:`~vlm_reroute.methods.spec.MethodSpec` (which the command line, the pipeline and the lmms-eval
plugin use directly); a budget (avg_T, ratio or FLOPs fraction) is solved per prompt for that
prompt's image sizes when the model runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..budget.rules import RULES, add_rule, rule_for
from ..budget.schedule import Keep

if TYPE_CHECKING:
    from .base import TokenReduction

#: Every registered method by key: the budget's table of schedule rules (a method class is its rule).
METHODS: dict[str, type[TokenReduction]] = RULES  # type: ignore[assignment]


def register(cls: type[TokenReduction]) -> type[TokenReduction]:
    """Class decorator: make a method reachable by its ``key`` (and its display name), and hand its
    schedule rule to the budget arithmetic (which imports no method)."""
    add_rule(cls)
    return cls


def method_names() -> tuple[str, ...]:
    _load()
    return tuple(METHODS)


def _load() -> None:
    from . import fastv, pdrop, random, sparsevlm  # noqa: F401  (registers the shipped methods)

    # isort: split
    from . import dart  # noqa: F401  (DART, arXiv 2502.11494: after the attention methods)

    # isort: split
    from . import nuwa  # noqa: F401  (registered last: budget tables list it after FastV and PDrop)

    # isort: split
    from . import divprune, visionzip  # noqa: F401  (stage-1 methods, after Nüwa)


def method_class(name: str, reroute: bool = False) -> tuple[type[TokenReduction], bool]:
    """``"fastv"``, ``"PDrop"``, ``"FastV + Reroute"``, ``"pdrop_reroute"``... → ``(class, reroute)``."""
    _load()
    return rule_for(name, reroute)  # type: ignore[return-value]


def method_from_spec(
    name: str,
    *,
    reroute: bool = False,
    tier: float | None = None,
    ratio: float | None = None,
    flops_fraction: float | None = None,
    strict: bool = False,
    layers: Sequence[int] | None = None,
    keep: Sequence[Keep] | None = None,
    model: Any = None,
    **settings: Any,
) -> TokenReduction:
    """A method from its name and either a budget (``tier`` = avg_T, ``ratio``, ``flops_fraction``)
    or an explicit schedule (``layers`` and ``keep``): ``MethodSpec.parse(...).build(model)``.

    With a budget the keep counts are solved per prompt, for each image's token count, on the
    decision layers ``layers`` (default: the method's published layers scaled to the model's
    depth). ``model`` (optional) is checked now instead of at the first call. ``settings`` go to
    the method's class (e.g. ``seed=`` for ``random``, ``score_from=``).
    """
    from .spec import MethodSpec  # the spec resolves names through this module

    spec = MethodSpec.parse(
        name,
        reroute=reroute,
        tier=tier,
        ratio=ratio,
        flops_fraction=flops_fraction,
        strict=strict,
        layers=layers,
        keep=keep,
        **settings,
    )
    return spec.build(model)  # type: ignore[return-value]  # None is vanilla, which parse never gives
