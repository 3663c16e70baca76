"""One statistic for every time and every speedup: the median, with the interquartile range as spread.

A speedup is the ratio of two medians (``median(vanilla) / median(method)``), never a median of
per-repeat ratios beside medians of times: a reader can recompute every ratio from the times
shown. Its range divides the quartiles crosswise (``q1(vanilla) / q3(method)`` to
``q3(vanilla) / q1(method)``), so it always contains the ratio and widens with either spread.
Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median, quantiles

__all__ = ["WIDE_SPREAD", "Ratio", "Spread", "ratio", "spread"]

#: relative spread ((q3 - q1) / median) above which timings are flagged as untrustworthy
WIDE_SPREAD = 0.10


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of repeated measurements (seconds, or any positive quantity).

    Timings are reported as median and quartiles rather than mean and deviation, so that one run
    disturbed by the machine barely moves them.
    """

    median: float
    q1: float
    q3: float
    n: int

    @property
    def relative(self) -> float:
        """Interquartile range over the median (0 for a single run)."""
        return (self.q3 - self.q1) / self.median if self.median else 0.0

    @property
    def wide(self) -> bool:
        return self.relative > WIDE_SPREAD

    def text(self, scale: float = 1.0, spec: str = ".1f") -> str:
        """``"20.1 (19.5–21.0)"``, or ``"20.1 (single run)"`` for one measurement."""
        head = f"{self.median * scale:{spec}}"
        if self.n == 1:
            return f"{head} (single run)"
        return f"{head} ({self.q1 * scale:{spec}}–{self.q3 * scale:{spec}})"


@dataclass(frozen=True)
class Ratio:
    """A ratio of two medians and the range the quartiles allow (a speedup, see :func:`ratio`)."""

    value: float
    low: float
    high: float

    def text(self, spec: str = ".2f") -> str:
        if self.low == self.high == self.value:
            return f"{self.value:{spec}}×"
        return f"{self.value:{spec}}× ({self.low:{spec}}–{self.high:{spec}})"


def spread(values: Sequence[float]) -> Spread:
    """Median and quartiles (inclusive method: with 5 runs, the 2nd and 4th values)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread() needs at least one measurement")
    if len(values) == 1:
        return Spread(values[0], values[0], values[0], 1)
    q1, _, q3 = quantiles(values, n=4, method="inclusive")
    return Spread(median(values), q1, q3, len(values))


def ratio(numerator: Spread, denominator: Spread) -> Ratio:
    """``numerator / denominator`` from the medians; range from the quartiles, crosswise."""
    return Ratio(
        numerator.median / denominator.median,
        numerator.q1 / denominator.q3,
        numerator.q3 / denominator.q1,
    )
