"""Closed sets of choices that several rooms share, as enums (a leaf: imports nothing of the package).

A choice compared in code is an enum member, never a bare string, so a typo fails where it is written
instead of silently taking the other branch. Each enum is a :class:`~enum.StrEnum`: the public edges
(constructor arguments, the command line, JSON) keep accepting and printing the plain strings, and
``repr`` shows the string too, so a method's ``repr`` (recorded in traces and reports) is unchanged.

Choices that stay inside one room live there: the head reduction in ``scoring/attention.py``, the
kind of forward call in ``engine/calls.py``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

__all__ = ["Choice", "ScoreFrom"]

_E = TypeVar("_E", bound="Choice")


class Choice(StrEnum):
    """A :class:`StrEnum` whose ``repr`` is its string (``'current'``), and a lenient lookup."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def of(cls: type[_E], value: Any) -> _E | None:
        """The member ``value`` names (a member or its string), or ``None``: callers raise their own
        one-line error, which names the setting and what is allowed."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            return None


class ScoreFrom(Choice):
    """Which layer's attention scores a decision at layer ``l``."""

    #: layer ``l``'s own attention (the Reroute paper's convention)
    CURRENT = "current"
    #: layer ``l - 1`` decides (the original FastV convention; Nüwa's stage 2)
    PREVIOUS = "previous"
