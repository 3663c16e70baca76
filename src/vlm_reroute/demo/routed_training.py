"""Routed training for the demo model: some rows of a batch go through the decoder on a random
visual-token schedule, half of them as prune and half as reroute (``--route-share``, run 12 on).

Why: the benchmark's signal under reduction (the better PDrop form at ratio 0.333 against vanilla)
fell as the model sharpened — 54 % on run 9, 42 % on run 10, 36 % on run 11 — while issue 17 asks
for ≥ 50 %. A model trained only on full token sets learns to read every patch and breaks when
tokens go. Training on reduced token sets helps, but *how* the set is reduced matters for the
comparison the demo exists for (docs/demo.md, "Robustness"): random token dropout alone is the
situation pruning creates and would tilt the comparison towards prune; random layer skipping
alone would tilt it towards reroute. So each routed row draws one schedule — decision layers and
non-increasing keep counts — and a **random** ranking at every decision, and routed rows alternate
between the two modes of the routing contract (``shared/design/method.md``; Reroute, arXiv
2606.12412):

- **prune**: a visual token not selected at a decision is gone for the rest of the decoder (it is
  no longer a key, and its state no longer matters);
- **reroute**: a visual token not selected skips the stage — it is not a key there and its state
  passes through unchanged — and competes again at the next decision (with a random ranking: it
  is drawn again from all visual tokens).

Same counts, same layers, same random rule, equal numbers of rows: neither form is favoured by
construction, and no method's scorer is learnt (the benchmark's methods rank by attention).
Routing is a pure function of (seed, step), so a resumed run routes exactly as an uninterrupted
one. The stage is applied by masking (keys) and by a residual pass-through (states), not by
compaction: training pays the full sequence, which is what it paid before.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch


@dataclass(frozen=True)
class RowRoute:
    """The schedule of one routed row: decisions at ``layers`` (increasing), ``keep[i]`` visual
    tokens in stage ``i`` (non-increasing), ``reroute`` or prune."""

    reroute: bool
    layers: tuple[int, ...]
    keep: tuple[int, ...]


def draw_routes(
    seed: int, step: int, batch_size: int, share: float, num_layers: int, num_visual: int
) -> list[RowRoute | None]:
    """Which rows of step ``step``'s batch are routed (``round(share * batch_size)`` of them) and
    how; None = the row runs the whole decoder on every token. Modes alternate over the routed
    rows, and the first mode alternates with the step, so prune and reroute rows stay equal in
    number over any two steps."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"route share {share!r}: give a fraction of the batch in [0, 1]")
    rng = random.Random(f"route/{seed}/{step}")
    routed = sorted(rng.sample(range(batch_size), round(share * batch_size)))
    out: list[RowRoute | None] = [None] * batch_size
    for i, row in enumerate(routed):
        out[row] = _draw(rng, (i + step) % 2 == 1, num_layers, num_visual)
    return out


def _draw(rng: random.Random, reroute: bool, num_layers: int, num_visual: int) -> RowRoute:
    """One to four decisions, the first at layer 1–3, then every 2–4 layers; the first stage keeps
    10–70 % of the visual tokens and each later one 40–100 % of the stage before (at least 4)."""
    layers = [rng.randint(1, 3)]
    for _ in range(rng.randint(0, 3)):
        nxt = layers[-1] + rng.randint(2, 4)
        if nxt >= num_layers:
            break
        layers.append(nxt)
    frac = rng.uniform(0.1, 0.7)
    keep = []
    for _ in layers:
        keep.append(max(4, min(num_visual, round(frac * num_visual))))
        frac *= rng.uniform(0.4, 1.0)
    keep = [min(keep[: i + 1]) for i in range(len(keep))]  # non-increasing after rounding
    return RowRoute(reroute, tuple(layers), tuple(keep))


def active_tokens(
    visual: torch.Tensor, routes: list[RowRoute | None], num_layers: int, generator: torch.Generator
) -> torch.Tensor:
    """``(num_layers, B, S)`` bool: whether each position takes part in each decoder layer.

    ``visual`` ``(B, S)`` marks the visual tokens. Text tokens always take part, and so does every
    token of an unrouted row and every token before a row's first decision. Prune draws each
    stage's tokens from the ones still present; reroute from all visual tokens."""
    active = torch.ones(num_layers, *visual.shape, dtype=torch.bool)
    for row, route in enumerate(routes):
        if route is None:
            continue
        where = visual[row].nonzero().squeeze(1)
        present = torch.ones(len(where), dtype=torch.bool)
        for (begin, end), keep in zip(pairwise((*route.layers, num_layers)), route.keep, strict=True):
            pool = torch.arange(len(where)) if route.reroute else present.nonzero().squeeze(1)
            chosen = pool[torch.randperm(len(pool), generator=generator)[:keep]]
            selected = torch.zeros(len(where), dtype=torch.bool)
            selected[chosen] = True
            if not route.reroute:
                present = selected
            active[begin:end, row, where[~selected]] = False
    return active


class RoutedDecoder:
    """Context manager: decoder layer ``l`` attends only to the positions active at ``l`` and
    leaves the states of the inactive ones unchanged. Forward hooks only (removed on exit, also on
    an error); the modules are not patched."""

    def __init__(self, layers: list[Any], active: torch.Tensor) -> None:
        if active.shape[0] != len(layers):
            raise ValueError(f"active tokens for {active.shape[0]} layers, the decoder has {len(layers)}")
        self.layers, self.active = layers, active
        self.handles: list[Any] = []
        self._inputs: dict[int, torch.Tensor] = {}

    def __enter__(self) -> RoutedDecoder:
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._enter_layer(index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._leave_layer(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self._inputs = [], {}

    def _enter_layer(self, index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._inputs[index] = hidden
            keys = self.active[index].to(hidden.device)[:, None, None, :]
            mask = kwargs.get("attention_mask")
            if mask is None:  # sdpa without padding: causal only
                length = hidden.shape[1]
                mask = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None, None]
            if mask.dtype == torch.bool:
                kwargs["attention_mask"] = mask & keys
            else:  # an additive float mask (eager attention)
                kwargs["attention_mask"] = mask.masked_fill(~keys, torch.finfo(mask.dtype).min)
            return args, kwargs

        return hook

    def _leave_layer(self, index: int) -> Any:
        def hook(module: Any, args: tuple, out: Any) -> Any:
            states = out[0] if isinstance(out, tuple) else out
            keep = self.active[index].to(states.device)[..., None]
            passed = torch.where(keep, states, self._inputs.pop(index).to(states.dtype))
            return (passed, *out[1:]) if isinstance(out, tuple) else passed

        return hook


def routed_batch(
    seed: int, step: int, share: float, batch: dict[str, torch.Tensor], layers: list[Any], image_token_id: int
) -> tuple[contextlib.AbstractContextManager[Any], dict[str, torch.Tensor]]:
    """The context that routes step ``step``'s batch (a no-op for ``share`` 0) and the batch with
    the pointing rows of routed rows left out: the pointing loss asks for attention on the target's
    visual tokens, which a random schedule may have taken out of the pointing layers."""
    if share == 0:
        return contextlib.nullcontext(), batch
    visual = batch["input_ids"] == image_token_id
    routes = draw_routes(seed, step, len(visual), share, len(layers), int(visual[0].sum()))
    generator = torch.Generator().manual_seed(random.Random(f"route-rank/{seed}/{step}").getrandbits(63))
    active = active_tokens(visual, routes, len(layers), generator)
    unrouted = torch.tensor([route is None for route in routes])[batch["point_rows"][:, 0]]
    kept = {"point_rows": batch["point_rows"][unrouted], "point_where": batch["point_where"][unrouted]}
    return RoutedDecoder(layers, active), {**batch, **kept}
