"""A budget to solve a schedule for, per prompt: absolute (avg_T) or relative (ratio, FLOPs). Pure Python.

Images of different sizes carry different numbers of visual tokens (Qwen's dynamic resolution),
so a method given a target solves its keep counts for each image's token count when the prompt
arrives, kvpress-style: ``ratio=0.111`` keeps 11.1 % of the visual tokens on average over the
layers (the paper's "88.9 % reduction"), ``avg_t=64`` keeps 64 per layer on average, and
``flops_fraction=0.25`` spends a quarter of the decoder's prefill FLOPs (PyramidDrop's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BudgetTarget"]


@dataclass(frozen=True)
class BudgetTarget:
    """Exactly one of ``avg_t``, ``ratio`` and ``flops_fraction``.

    An unreachable target is clamped to the nearest reachable one with a warning naming what was
    used; with ``strict=True`` it is an error instead.
    """

    avg_t: float | None = None
    ratio: float | None = None
    flops_fraction: float | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.as_dict().items() if v is not None}
        if len(given) != 1:
            raise ValueError(
                f"BudgetTarget({', '.join(f'{k}={v!r}' for k, v in given.items()) or ''}): give exactly one "
                "of avg_t (visual tokens per layer), ratio (fraction of visual tokens kept on average) "
                "and flops_fraction (fraction of the decoder's prefill FLOPs)"
            )
        ((name, value),) = given.items()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"BudgetTarget({name}={value!r}): a number is needed")
        if name == "avg_t" and not value > 0:
            raise ValueError(f"BudgetTarget(avg_t={value!r}): visual tokens per layer must be > 0")
        if name != "avg_t" and not 0 < value <= 1:
            raise ValueError(f"BudgetTarget({name}={value!r}): a fraction must be in (0, 1]")

    def as_dict(self) -> dict[str, float | None]:
        return {"avg_t": self.avg_t, "ratio": self.ratio, "flops_fraction": self.flops_fraction}

    def describe(self) -> str:
        if self.avg_t is not None:
            return f"avg_T = {self.avg_t:g}"
        if self.ratio is not None:
            return f"ratio = {self.ratio:g}"
        return f"FLOPs fraction = {self.flops_fraction:g}"

    def avg_t_for(self, n_visual: int) -> float | None:
        """The avg_T this target asks of an image of ``n_visual`` tokens (None: a FLOPs target)."""
        if self.avg_t is not None:
            return float(self.avg_t)
        if self.ratio is not None:
            return self.ratio * n_visual
        return None
