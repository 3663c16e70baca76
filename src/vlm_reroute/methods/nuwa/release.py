"""Nüwa's two published releases (arXiv 2602.02951; ``nuwa.md`` §1.4, §3.1, §3.3, §5) and which one a
model gets.

The paper released stage 1 for two kinds of vision tower, and each release fixed its own constants: the
setting it is given by (LLaVA-1.5: ``budget``; Qwen2.5-VL: ``ratio``), where stage 2 applies from, the
gate quantile, the aggregation kernel and the stage-2 scorer. They are keyed here by the tower kind, and
a model's kind is what the family table declares (:attr:`vlm_reroute.families.Family.vision`), so no
family name appears in the method: a family joins Nüwa by declaring its tower kind, and a new kind is
one :class:`Release` here plus its signal hooks (``vision.py``).

Torch-free (the budget arithmetic and ``vlm-reroute budget`` import it through the method registry).
Importing it registers each Nüwa family's tower with the stage-1 cost (:mod:`vlm_reroute.budget.stage1`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...budget.schedule import Keep
from ...budget.stage1 import CLIP, MERGER_VIT, WINDOWED_VIT, VisionTower, add_tower
from ...families import FAMILIES, Family
from ...kinds import ScoreFrom

if TYPE_CHECKING:
    from ...scoring.base import Scorer

#: LLaVA-1.5 release: budget (layer-averaged visual tokens at 576) -> (K₁, K₂, n per cell)
LLAVA_BUDGETS: Mapping[float, tuple[Keep, Keep, int]] = {
    64: (112, 16, 1),
    128: (224, 32, 2),
    192: (336, 48, 3),
}
#: Qwen2.5-VL release: ratio (layer-averaged retention) -> (s₁, s₂ of the anchors, n per cell)
QWEN_RATIOS: Mapping[float, tuple[Keep, Keep, int]] = {
    0.25: (0.35, 0.42, 3),
    0.5: (0.60, 0.66, 3),
    0.75: (0.85, 0.70, 4),
}


@dataclass(frozen=True)
class FamilySettings:
    """Stage-1 constants of one release (``nuwa.md`` §1.4, §3.1, §5)."""

    gate_quantile: float
    weighting: str
    tau: float | None  # kernel radius in grid cells; None: 0.8 × the padded grid's diagonal


@dataclass(frozen=True)
class Release:
    """One published release: the ``setting`` it is given by and its ``presets`` (setting -> (K₁, K₂,
    n per cell)) with the headline ``default``, ``stage2`` = (layer, depth) stage 2 applies from, the
    ``tower`` (width, gate quantile: the stage-1 cost reads it too), the aggregation ``weighting`` it
    shipped (``official=True``) and radius ``tau`` (None: from the padded grid), and its stage-2 scorer:
    the last ``rows`` query rows, ``heads`` reduction, rows scored without a causal mask among them under
    ``official`` when ``unmasked``."""

    setting: str
    presets: Mapping[float, tuple[Keep, Keep, int]]
    default: float
    stage2: tuple[int, int]
    tower: VisionTower
    weighting: str
    tau: float | None
    rows: int = 1
    heads: str = "mean"
    unmasked: bool = False

    def settings(self, official: bool) -> FamilySettings:
        """The stage-1 constants: the release's weighting when ``official``, else the convex fix."""
        return FamilySettings(self.tower.gate_quantile, self.weighting if official else "convex", self.tau)

    def scorer(self, official: bool) -> Scorer:
        """The stage-2 scorer: attention of the last rows at the layer before the stage-2 layer."""
        from ...scoring.attention import HeadReduction, LastTokenAttention

        causal = not (official and self.unmasked)
        heads = HeadReduction(self.heads)
        return LastTokenAttention(rows=self.rows, heads=heads, score_from=ScoreFrom.PREVIOUS, causal=causal)

    @property
    def model(self) -> str:
        """The model it was released for, for messages: the first family in the table with its tower."""
        return next(f.label for f in FAMILIES if f.vision == self.tower.kind)

    @property
    def choices(self) -> str:
        """The released settings, for messages: ``64 / 128 / 192``."""
        return " / ".join(f"{value:g}" for value in self.presets)


#: The releases by tower kind (:data:`~vlm_reroute.budget.stage1.CLIP`: CLIP ViT-L/14-336 of LLaVA-1.5;
#: :data:`~vlm_reroute.budget.stage1.WINDOWED_VIT`: Qwen2.5-VL's ViT, 2×2 patches per token).
RELEASES: Mapping[str, Release] = {
    CLIP: Release(
        setting="budget",
        presets=LLAVA_BUDGETS,
        default=64,
        stage2=(16, 32),
        tower=VisionTower(CLIP, 1024, 0.55),
        weighting="release_llava",
        tau=math.sqrt(280.0),  # τ = √DIST in patches, DIST = 280 (aggregate.llava_tau; nuwa.md §1.4)
    ),
    WINDOWED_VIT: Release(
        setting="ratio",
        presets=QWEN_RATIOS,
        default=0.25,
        stage2=(15, 28),
        tower=VisionTower(WINDOWED_VIT, 1280, 0.1, merge=4),
        weighting="release_qwen",
        tau=None,
        rows=3,
        heads="max",
        unmasked=True,
    ),
}
#: Qwen2-VL, Qwen3-VL and Qwen3.5 towers have the same blocks and merger without windows: the Qwen2.5-VL
#: release's constants, the hooks skip the window order (``signals.QwenSignalHooks``).
RELEASES = {
    **RELEASES,
    MERGER_VIT: dataclasses.replace(
        RELEASES[WINDOWED_VIT], tower=VisionTower(MERGER_VIT, 1280, 0.1, merge=4)
    ),
}
#: The multi-view families (LLaVA-NeXT, OneVision: the CLIP release; InternVL, Idefics3, SmolVLM: the
#: merger release, as ``families.py`` declares) reuse these constants; their stage 1 runs per view
#: (``views.py``), the releases' stage 2 unchanged.
#: An unbound Nüwa (no model yet) uses the first release's constants.
DEFAULT = RELEASES[CLIP]
#: The release a ``budget=`` or ``ratio=`` setting belongs to.
BY_SETTING: Mapping[str, Release] = {r.setting: r for r in reversed(list(RELEASES.values()))}  # the first


def nuwa_families() -> tuple[Family, ...]:
    """The families Nüwa is defined for: those whose tower kind has a release, in table order."""
    return tuple(f for f in FAMILIES if f.vision in RELEASES)


def release_for(model: Any) -> tuple[Family, Release]:
    """``model``'s family and its tower's release, else a TypeError naming the families Nüwa knows."""
    name = type(model).__name__
    for family in nuwa_families():
        if family.model_class == name:
            return family, RELEASES[family.vision]  # type: ignore[index]
    known = ", ".join(f"{f.label} ({f.model_class})" for f in nuwa_families())
    listed = next((f for f in FAMILIES if f.model_class == name), None)
    if listed is None:
        raise TypeError(f"Nüwa is defined for {known}; {name} needs its own stage-1 signals")
    raise TypeError(
        f"Nüwa is defined for {known}; {listed.label} ({name}) declares no release in the family table "
        "(Family.vision names the release whose constants its stage 1 uses); VisionZip and DivPrune run on it"
    )


def check_release_setting(name: str, value: float | None, family: Family, release: Release) -> None:
    """Refuse a released setting (``budget=`` / ``ratio=``) given for a model of the other release."""
    if value is None or release.setting == name:
        return
    raise ValueError(
        f"Nuwa({name}={value}) is the {BY_SETTING[name].model} release's setting; on {family.label} give "
        f"{release.setting}={release.choices} (its release's), k1= and k2=, or target="
    )


for _family in nuwa_families():
    add_tower(_family.name, RELEASES[_family.vision].tower)  # type: ignore[index]
