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


# ---- SparseVLM (arXiv 2410.04417): published tiers as its release runs them ----------------------

#: SparseVLM's published keep counts on LLaVA-1.5-7B (576 tokens), per variant and tier: the
#: release's ``score.py`` @26a5f48 (v1.5 = the default, v2.0 = SparseVLM+, ``USE_VERSION=2_0``);
#: pruning after layers 2, 6, 15 = decisions at layers 3, 7, 16 (``methods.md`` §3.1 b, §2).
SPARSEVLM_KEEP: dict[str, dict[int, tuple[int, ...]]] = {
    "v1.5": {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)},
    "v2.0": {64: (66, 34, 20), 96: (246, 54, 28), 128: (238, 108, 60), 192: (300, 200, 118)},
}
SPARSEVLM_LAYERS = (3, 7, 16)


def sparsevlm_recycled(n_visual: int, keep: tuple[int, ...]) -> tuple[int, ...]:
    """Cluster tokens SparseVLM v1.5 adds at each decision (``methods.md`` §3.1 c, the release's
    ``modelling_sparse_llama.py`` L273–305): of the ``p`` tokens pruned there, ``m = ⌊0.3·p⌋ + 1``
    are clustered into ``⌊m/10⌋ + 1`` merged tokens, which count as visual at the next decision."""
    out, present = [], n_visual
    for k in keep:
        pruned = present - k
        clusters = (int(pruned * 0.3) + 1) // 10 + 1 if pruned > 0 else 0
        out.append(clusters)
        present = k + clusters
    return tuple(out)


@dataclass(frozen=True)
class CodeLevelTier:
    """A published tier ("64", "128", ...) and the visual tokens its release actually runs per layer."""

    method: str
    variant: str
    tier: int
    layers: tuple[int, ...]
    keep: tuple[int, ...]
    recycled: tuple[int, ...]
    num_layers: int = 32
    n_visual: int = 576

    @property
    def avg_t(self) -> float:
        """avg_T at code level: kept plus recycled tokens in every stage."""
        counts = tuple(k + r for k, r in zip(self.keep, self.recycled, strict=True))
        return (
            sum(visual_tokens_per_layer(self.num_layers, self.n_visual, self.layers, counts))
            / self.num_layers
        )

    @property
    def nominal_avg_t(self) -> float:
        """avg_T of the kept counts alone (no recycled tokens)."""
        return (
            sum(visual_tokens_per_layer(self.num_layers, self.n_visual, self.layers, self.keep))
            / self.num_layers
        )


def _code_level() -> tuple[CodeLevelTier, ...]:
    out = []
    for variant, tiers in SPARSEVLM_KEEP.items():
        for tier, keep in tiers.items():
            recycled = sparsevlm_recycled(576, keep) if variant == "v1.5" else (0,) * len(keep)
            out.append(CodeLevelTier("sparsevlm", variant, tier, SPARSEVLM_LAYERS, keep, recycled))
    return tuple(out)


#: Published tiers whose release runs more tokens than the label says (LLaVA-1.5-7B, 32 layers).
CODE_LEVEL: tuple[CodeLevelTier, ...] = _code_level()


def code_level_tiers(method: str) -> tuple[CodeLevelTier, ...]:
    """The code-level tiers of registry key ``method`` (none for most methods)."""
    return tuple(entry for entry in CODE_LEVEL if entry.method == method)


# ---- DART, VisionZip, DivPrune: what their published tiers run (``methods.md`` §2) ---------------

#: avg_T at code level of each published tier on LLaVA-1.5-7B (576 tokens, 32 layers), with how it
#: follows from the release: DART keeps layers 0-1 full, then 4 + 8·⌊T/8⌋ tokens (run with
#: ``max_num_trunction`` = T); VisionZip enters exactly D + C tokens; DivPrune's default ratio 0.098
#: keeps 56.
STAGE_TIERS: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    "dart": ("layers 0-1 full, then 4 + 8·⌊T/8⌋", (("64", 99.75), ("128", 159.75), ("192", 219.75))),
    "visionzip": ("D + C tokens enter", (("64", 64.0), ("128", 128.0), ("192", 192.0))),
    "divprune": ("ratio 0.098 of the image", (("0.098", 56.0),)),
}
