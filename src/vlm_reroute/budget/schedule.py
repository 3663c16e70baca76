"""One schedule: decision layers, what each stage keeps, prune or reroute. Pure Python (no torch).

Every part of the project (methods, budget arithmetic, the solver, the command line) builds and
checks schedules here, with one set of rules and one set of messages:

* decision layers are ints, strictly increasing, and lie in ``1 .. L-1`` once the depth ``L`` is
  known (layer 0 never decides: its cache is the one ``transformers`` reads the sequence length
  from, and the ``"previous"`` scoring convention needs a layer ``l-1``);
* one keep entry per decision: an int ≥ 1 (visual tokens kept per image) or a float in (0, 1]
  (fraction of each image's tokens, resolved as ``max(1, int(n · f))``);
* under prune (``reroute=False``) the counts must not increase: a removed token cannot come back;
* an optional ``entry``: the visual tokens per image that enter the language model at all, for a
  method that reduces before it (Nüwa's stage 1). The layers before the first decision then carry
  the entry count; a ratio keep is then a fraction of the entering tokens, and a ratio entry is
  ``min(n, ceil(n · f))`` (the Nüwa release's rule for K₁, ``nuwa.md`` §3.1). In budget arithmetic
  (``layers``/``keep`` lists) the entry is written as a decision at layer 0;
* an optional ``withdraw_at=K``: a terminal stage from layer ``K`` on in which no visual token goes
  through any layer (VTW, arXiv 2405.05803: "visual tokens withdrawal"). It needs no ranking, so it
  is the same under prune and reroute; ``K`` lies after the last decision layer and before the end
  (``last decision + 1 .. L-1``). Budget arithmetic takes it as its own keyword.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

Keep = int | float

__all__ = ["Keep", "Schedule", "check_keep_value", "check_withdraw", "resolve_keep"]


def check_keep_value(owner: str, keep: object) -> None:
    """One keep entry: an int ≥ 1 (tokens per image) or a float in (0, 1] (fraction of the image)."""
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise TypeError(
            f"{owner}(keep={keep!r}): a keep entry is an int (tokens kept per image) "
            "or a float in (0, 1] (fraction of each image's visual tokens)"
        )
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{owner}(keep={keep!r}): a token count must be ≥ 1")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"{owner}(keep={keep!r}): a keep ratio must be in (0, 1]")


def check_withdraw(
    owner: str, withdraw_at: object, layers: Sequence[int] = (), num_layers: int | None = None
) -> None:
    """``withdraw_at``: an int after the last decision layer and, once the depth is known, ``≤ L-1``."""
    if withdraw_at is None:
        return
    if isinstance(withdraw_at, bool) or not isinstance(withdraw_at, int):
        raise TypeError(
            f"{owner}(withdraw_at={withdraw_at!r}): withdraw_at is a decoder layer index (an int)"
        )
    last = max(layers, default=0)
    top = f"{num_layers - 1}" if num_layers is not None else "L-1"
    if withdraw_at <= last or (num_layers is not None and withdraw_at >= num_layers):
        where = f"the last decision layer is {last}" if layers else "layer 0 holds every token"
        depth = (
            f"this decoder has {num_layers} layers" if num_layers is not None else "L = the decoder's depth"
        )
        raise ValueError(
            f"{owner}(withdraw_at={withdraw_at!r}): {where} and {depth}, so withdraw_at must be in "
            f"{last + 1}..{top} (visual tokens leave after the last decision, before the last layer)"
        )


def resolve_keep(owner: str, keep: Keep, n_tokens: int) -> int:
    """Tokens one image of ``n_tokens`` keeps: the int itself, or ``max(1, int(n · ratio))``."""
    if isinstance(keep, float):
        return max(1, int(n_tokens * keep))
    if keep > n_tokens:
        raise ValueError(
            f"{owner}(keep={keep!r}): an image has only {n_tokens} visual tokens; "
            f"a count must be in 1..{n_tokens} (or give a ratio in (0, 1])"
        )
    return keep


@dataclass(frozen=True)
class Schedule:
    """Decision ``layers``, the ``keep`` entry of each stage, and whether deferred tokens may return.

    Stage ``i`` runs from ``layers[i]`` up to (not including) ``layers[i + 1]``, or to the last
    layer. Layers before the first decision carry every visual token. ``owner`` only names the
    method in error messages. ``withdraw_at``: from this layer on no visual token runs (VTW).
    """

    layers: tuple[int, ...]
    keep: tuple[Keep, ...]
    reroute: bool = False
    owner: str = field(default="Schedule", compare=False)
    entry: Keep | None = None
    withdraw_at: int | None = None

    def __post_init__(self) -> None:
        layers, keep = tuple(self.layers), tuple(self.keep)
        if self.entry is not None:
            check_keep_value(self.owner, self.entry)
            if isinstance(self.entry, int) and any(isinstance(k, int) and k > self.entry for k in keep):
                raise ValueError(
                    f"{self.owner}(entry={self.entry!r}, keep={list(keep)!r}): a stage cannot keep more "
                    "tokens than enter the language model"
                )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", keep)
        owner = self.owner
        if not isinstance(self.reroute, bool):
            raise TypeError(f"{owner}(reroute={self.reroute!r}): reroute is True or False")
        if not layers:
            raise ValueError(f"{owner}(layers=[]): at least one decision layer is needed")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"{owner}(layers={list(layers)!r}): decision layers are ints")
            if layer < 1:
                raise ValueError(
                    f"{owner}(layers={list(layers)!r}): layer {layer} is out of range; decision layers "
                    "start at 1 (layer 0 holds every token)"
                )
        if any(b <= a for a, b in pairwise(layers)):
            raise ValueError(
                f"{owner}(layers={list(layers)!r}): decision layers must be strictly increasing "
                "(sorted, no repeats)"
            )
        if len(keep) != len(layers):
            raise ValueError(
                f"{owner}(layers={list(layers)!r}, keep={list(keep)!r}): one keep entry per decision "
                f"layer is needed ({len(layers)} layers, {len(keep)} keep entries)"
            )
        for k in keep:
            check_keep_value(owner, k)
        same_kind = all(isinstance(k, int) for k in keep) or all(isinstance(k, float) for k in keep)
        if not self.reroute and same_kind and any(b > a for a, b in pairwise(keep)):
            raise ValueError(
                f"{owner}(keep={list(keep)!r}) with reroute=False: pruned tokens cannot come back, "
                "so keep counts must not increase from stage to stage"
            )
        check_withdraw(owner, self.withdraw_at, layers)

    def check_depth(self, num_layers: int) -> None:
        """Every decision layer must lie in ``1 .. num_layers - 1``, and ``withdraw_at`` after them."""
        for layer in self.layers:
            if not 1 <= layer < num_layers:
                raise ValueError(
                    f"{self.owner}(layers={list(self.layers)!r}): layer {layer} is out of range; this "
                    f"decoder has {num_layers} layers, so decision layers must be in 1..{num_layers - 1}"
                )
        check_withdraw(self.owner, self.withdraw_at, self.layers, num_layers)

    def entry_count(self, n_visual: int) -> int:
        """Visual tokens of one image of ``n_visual`` tokens that enter the language model."""
        if self.entry is None:
            return n_visual
        if isinstance(self.entry, float):
            return min(n_visual, math.ceil(n_visual * self.entry))
        return resolve_keep(self.owner, self.entry, n_visual)

    def counts(self, n_visual: int) -> tuple[int, ...]:
        """Keep counts of every stage for one image of ``n_visual`` tokens.

        Under prune the resolved counts must not increase (int and ratio entries can only be
        compared once the image size is known). With an entry, counts are taken of the tokens that
        enter and must not exceed them.
        """
        entering = self.entry_count(n_visual)
        counts = tuple(resolve_keep(self.owner, k, entering) for k in self.keep)
        if not self.reroute and any(b > a for a, b in pairwise(counts)):
            raise ValueError(
                f"{self.owner}(keep={list(self.keep)!r}) with reroute=False: for an image of {n_visual} "
                f"tokens the counts {list(counts)} increase; under prune they must not increase"
            )
        return counts

    def budget_form(self, n_visual: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(layers, counts)`` as budget arithmetic takes them: the entry, if any, as layer 0."""
        counts = self.counts(n_visual)
        if self.entry is None:
            return self.layers, counts
        return (0, *self.layers), (self.entry_count(n_visual), *counts)

    def tokens_per_layer(self, num_layers: int, n_visual: int) -> list[int]:
        """Visual tokens of one image entering each of the ``num_layers`` layers."""
        self.check_depth(num_layers)
        per_layer = [self.entry_count(n_visual)] * num_layers
        bounds = [*self.layers, num_layers]
        for i, k in enumerate(self.counts(n_visual)):
            per_layer[bounds[i] : bounds[i + 1]] = [k] * (bounds[i + 1] - bounds[i])
        if self.withdraw_at is not None:
            per_layer[self.withdraw_at :] = [0] * (num_layers - self.withdraw_at)
        return per_layer

    def avg_t(self, num_layers: int, n_visual: int) -> float:
        """avg_T: the mean over all layers of the visual tokens (per image) entering each."""
        return sum(self.tokens_per_layer(num_layers, n_visual)) / num_layers

    @classmethod
    def of(
        cls,
        layers: Sequence[int],
        keep: Sequence[Keep],
        reroute: bool = False,
        owner: str = "Schedule",
        entry: Keep | None = None,
        withdraw_at: int | None = None,
    ):
        """Build from any sequences (lists from a user, tuples from the solver)."""
        return cls(tuple(layers), tuple(keep), reroute, owner, entry, withdraw_at)

    @classmethod
    def from_budget_form(
        cls,
        layers: Sequence[int],
        keep: Sequence[Keep],
        reroute: bool = False,
        owner: str = "Schedule",
        withdraw_at: int | None = None,
    ):
        """The schedule of budget-arithmetic ``layers``/``keep``, where a layer 0 followed by decisions
        is the entry (a layer 0 alone is refused like any decision at layer 0)."""
        layers, keep = tuple(layers), tuple(keep)
        if len(layers) > 1 and layers[0] == 0:
            if len(keep) != len(layers):
                raise ValueError(
                    f"{owner}(layers={list(layers)!r}, keep={list(keep)!r}): one keep entry per layer is "
                    f"needed ({len(layers)} layers, {len(keep)} keep entries)"
                )
            return cls(layers[1:], keep[1:], reroute, owner, keep[0], withdraw_at)
        return cls(layers, keep, reroute, owner, None, withdraw_at)
