"""The published schedules (``method.md``): decision layers and keep fractions of 576, as the papers ran them.

FastV baseline, FastV + Reroute, PDrop baseline and PDrop + Reroute on LLaVA-1.5 (32 layers) and
Qwen2.5-VL-7B (28 layers) at avg_T = 192 / 128 / 64. Pure Python; the keys are registry keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import visual_tokens_per_layer
from .rules import rule_for


@dataclass(frozen=True)
class PublishedSchedule:
    """A schedule as published: decision layers and keep fractions of ``n_visual``."""

    model: str
    tier: int
    method: str
    reroute: bool
    layers: tuple[int, ...]
    fractions: tuple[float, ...]
    num_layers: int
    n_visual: int = 576

    @property
    def name(self) -> str:
        return rule_for(self.method)[0].label(self.reroute)

    @property
    def keep(self) -> tuple[int, ...]:
        """Counts as the published code resolves them: ``max(1, int(n_visual · f))``."""
        return tuple(max(1, int(self.n_visual * f)) for f in self.fractions)

    @property
    def avg_t(self) -> float:
        return published_avg_t(self)


def published_avg_t(entry: PublishedSchedule) -> float:
    """avg_T that a published schedule actually achieves (counts resolved as the published code does)."""
    counts = visual_tokens_per_layer(entry.num_layers, entry.n_visual, entry.layers, entry.keep)
    return sum(counts) / entry.num_layers


_FASTV_F = {192: 0.2644, 128: 0.1418, 64: 0.01916}
_PDROP_F = {
    192: (0.5965, 0.3558, 0.2123, 0.1266),
    128: (0.4570, 0.2088, 0.0954, 0.0436),
    64: (0.2789, 0.0937, 0.0315, 0.0106),
}
_PDROP_REROUTE_A = {192: 0.4502, 128: 0.2655, 64: 0.1392}
# model: (num_layers, FastV layer, FastV + Reroute layers, PDrop layers). The Qwen FastV baseline
# layer (3) is the first of its re-decision layers; method.md gives only the multi-decision lists.
_PUBLISHED_MODELS = {
    "llava-1.5": (32, (3,), (3, 7, 15, 23), (2, 7, 15, 23)),
    "qwen2.5-vl-7b": (28, (3,), (3, 6, 13, 20), (2, 6, 13, 20)),
}


def _published() -> tuple[PublishedSchedule, ...]:
    out = []
    for model, (nl, fastv, fastv_rr, pdrop) in _PUBLISHED_MODELS.items():
        for tier in (192, 128, 64):
            f, a = _FASTV_F[tier], _PDROP_REROUTE_A[tier]
            out += [
                PublishedSchedule(model, tier, "fastv", False, fastv, (f,), nl),
                PublishedSchedule(model, tier, "fastv", True, fastv_rr, (f,) * len(fastv_rr), nl),
                PublishedSchedule(model, tier, "pdrop", False, pdrop, _PDROP_F[tier], nl),
                PublishedSchedule(model, tier, "pdrop", True, pdrop, (a, a, a / 2, a / 4), nl),
            ]
    return tuple(out)


PUBLISHED: tuple[PublishedSchedule, ...] = _published()


def published_methods() -> tuple[str, ...]:
    """Registry keys with published schedules (Nüwa's release gives its own settings, ``nuwa.md`` §5)."""
    return tuple(dict.fromkeys(entry.method for entry in PUBLISHED))


def published_schedule(model: str, tier: int, method: str, reroute: bool = False) -> PublishedSchedule:
    """Look up a published schedule (``model``: ``"llava-1.5"`` or ``"qwen2.5-vl-7b"``)."""
    cls, reroute = rule_for(method, reroute)
    method = cls.key
    for entry in PUBLISHED:
        if (entry.model, entry.tier, entry.method, entry.reroute) == (model, tier, method, reroute):
            return entry
    raise ValueError(
        f"no published schedule for model={model!r}, tier={tier!r}; models: {sorted(_PUBLISHED_MODELS)}, "
        "tiers: 192, 128, 64"
    )
