"""Integer searches behind the schedule solver: the first-stage count ``a`` closest to a target, and
±1 moves of stage counts that close the last gap (pure Python, no loops over tokens)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from itertools import pairwise


def closest_a(n: int, value: Callable[[int], float], target: float) -> int:
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


def close_gap(
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
