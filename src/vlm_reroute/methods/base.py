"""Token-reduction methods: small dataclasses with their settings, applied as context managers.

``with PDrop(layers=[2, 7, 15, 23], keep=[...], reroute=True)(model) as trace:`` routes every
forward and ``generate()`` call inside the block; leaving the block removes every hook, so the
model is exactly what it was.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from ..adapters import adapter_for
from ..engine.executor import Plan, RoutingExecutor
from ..engine.schedule import Keep, Stage, check_keep_value, check_layers_for_model, check_schedule
from ..engine.trace import Trace

SCORE_FROM = ("current", "previous")
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class TokenReduction:
    """Shared behaviour of the methods: the schedule, its checks and the context manager."""

    reroute: bool
    score_from: str

    @property
    def name(self) -> str:
        return type(self).__name__

    def stages(self) -> tuple[Stage, ...]:
        raise NotImplementedError

    def _check_score_from(self) -> None:
        if self.score_from not in SCORE_FROM:
            raise ValueError(
                f"{self.name}(score_from={self.score_from!r}): allowed are 'current' (layer l's own "
                "attention decides layer l, the paper's convention) and 'previous' (layer l-1 decides, "
                "the original FastV convention)"
            )

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[Trace]:
        adapter = adapter_for(model)
        stages = self.stages()
        check_layers_for_model(self.name, [s.layer for s in stages], len(adapter.layers), first=1)
        if model in _ACTIVE:
            raise RuntimeError(f"{type(model).__name__} already has a vlm-reroute method applied; nest none")
        trace = Trace(method=repr(self))
        plan = Plan(method=self.name, stages=stages, reroute=self.reroute, score_from=self.score_from)
        executor = RoutingExecutor(model, adapter, plan, trace)
        _ACTIVE.add(model)
        try:
            executor.install()
            yield trace
        finally:
            executor.remove()
            _ACTIVE.discard(model)


@dataclass
class FastV(TokenReduction):
    """FastV: one decision at ``layer`` keeping ``keep`` visual tokens per image.

    With one decision nothing can re-enter, so ``reroute`` changes nothing here; FastV + Reroute
    re-decides at later layers with FastV's count, i.e. ``PDrop(layers, [k] * n, reroute=True)``.
    """

    layer: int = 3
    keep: Keep = 0.5
    reroute: bool = False
    score_from: str = "current"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"FastV(layer={self.layer!r}): the decision layer is an int")
        check_keep_value(self.name, self.keep)
        self._check_score_from()

    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.layer, self.keep),)


@dataclass
class PDrop(TokenReduction):
    """PyramidDrop: decisions at ``layers``, stage ``i`` keeping ``keep[i]`` tokens per image.

    The defaults are the original PyramidDrop (LLaVA-1.5, 32 layers): decisions at 8, 16, 24
    halving the tokens each time. ``reroute=True`` lets every visual token compete again at each
    decision instead of removing the losers for good.
    """

    layers: Sequence[int] = field(default_factory=lambda: [8, 16, 24])
    keep: Sequence[Keep] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    reroute: bool = False
    score_from: str = "current"

    def __post_init__(self) -> None:
        self.layers, self.keep = list(self.layers), list(self.keep)
        check_schedule(self.name, self.layers, self.keep, self.reroute)
        self._check_score_from()

    def stages(self) -> tuple[Stage, ...]:
        return tuple(Stage(layer, k) for layer, k in zip(self.layers, self.keep, strict=True))
