"""Schedule rules: what the torch-free budget arithmetic needs to know about a method, and their table.

The solver, the published schedules and the budget tables work on a :class:`ScheduleRule` — a
method's decision layers for a depth, its keep counts from a first-stage count, whether it reduces
before the language model — never on the method itself. Methods register their class as a rule
(``methods/registry.py:register``, run when ``vlm_reroute`` is imported), so this package imports
nothing else of the package and a new method needs no edit here.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)


class ScheduleRule(Protocol):
    """A method's schedule as the budget arithmetic sees it (implemented by each method's class)."""

    key: ClassVar[str]  # registry key, e.g. "pdrop"
    stage_zero: ClassVar[bool]  # the first count applies before the language model (layer 0)
    same_count: ClassVar[bool]  # every stage keeps the same count (FastV + Reroute)
    prune_decisions: ClassVar[int | None]  # decisions under prune (FastV: 1), None: as many as layers
    tabulated: ClassVar[bool]  # a row of its own in budget tables

    @classmethod
    def label(cls, reroute: bool) -> str: ...

    @classmethod
    def default_layers(cls, num_layers: int, reroute: bool = False) -> tuple[int, ...]: ...

    @classmethod
    def keep_rule(cls, a: int, n_visual: int, num_stages: int, reroute: bool) -> list[float]: ...

    @classmethod
    def from_schedule(cls, schedule: Any, **settings: Any) -> Any: ...


#: Every registered rule by key, in registration order (budget tables list them in this order).
RULES: dict[str, type[ScheduleRule]] = {}


def add_rule(rule: type[ScheduleRule]) -> None:
    """Make ``rule`` reachable by its key (called by ``methods.registry.register``)."""
    if not rule.key or rule.key in RULES and RULES[rule.key] is not rule:
        raise ValueError(f"method key {rule.key!r} of {rule.__name__} is empty or already registered")
    RULES[rule.key] = rule


def rule_names() -> tuple[str, ...]:
    return tuple(RULES)


def rule_for(method: str | type, reroute: bool = False) -> tuple[type[ScheduleRule], bool]:
    """``"fastv"``, ``"PDrop"``, ``"FastV + Reroute"``, ``"pdrop_reroute"`` or a rule: ``(rule, reroute)``."""
    if isinstance(method, type) and method in RULES.values():
        return method, bool(reroute)
    text = str(method).lower().replace(" ", "").replace("_", "+").replace("-", "+")
    if text.endswith("+reroute"):
        text, reroute = text.removesuffix("+reroute"), True
    if text not in RULES:
        raise ValueError(
            f"unknown method {method!r}; allowed: {', '.join(RULES)} (optionally with '+ reroute')"
        )
    return RULES[text], bool(reroute)
