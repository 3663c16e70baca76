"""The vision-side cost of Nüwa's stage 1 (arXiv 2602.02951), kept apart from the decoder budget.

Pure Python. Multiply-accumulates per image, as the decoder budget counts them, of what this
library's stage 1 computes on top of the untouched vision tower (``methods/nuwa/signals.py``,
``methods/nuwa/aggregate.py``; ``d`` the tower's width, ``N`` the image's tokens, ``K₁`` its anchors):

* **salience** — a CLIP tower (LLaVA-1.5): the [CLS] query row and the keys of the feature-layer block,
  recomputed from its input because the tower's own attention does not return them:
  ``(N + 2)·d² + (N + 1)·d``. A windowed ViT with a patch merger (Qwen2.5-VL): the attention every
  patch *receives* in the last block needs every query row: the block's ``qkv`` projection again
  (``3·P·d²`` for ``P = mN`` patches, ``m`` = 4 patches merged per token) and ``P²·d`` scores (the
  last block attends over the whole image).
* **similarity** — CLIP: running sums of block outputs only (no MACs). Windowed ViT: the patch
  merger on the averaged block outputs, ``N·(md·md + md·D)`` with ``D`` the language model's width.
* **aggregation** — the ``L = ⌈q·(K₁ − 1)⌉`` anchors below the gate quantile ``q`` (linear
  interpolation over distinct saliences) build one cosine row and one weighted sum each:
  ``L·N·(Ds + Df) + N·Ds`` (``Ds`` similarity width, ``Df`` feature width: the tower's ``d`` for a
  CLIP tower, whose aggregation precedes the projector; ``D`` for a windowed ViT, whose follows the
  merger).

Norms, softmax, distances and sorting are not counted (linear in ``N`` or ``L·N`` without a width).

What a family's tower is, this package does not know (it imports nothing of the package): a caller
hands in a :class:`VisionTower`, or names one registered with :func:`add_tower` (Nüwa registers its
released towers under the names of the families in the family table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .shapes import ModelShape

__all__ = [
    "CLIP",
    "MERGER_VIT",
    "NUWA_TOWERS",
    "WINDOWED_VIT",
    "Stage1Cost",
    "VisionTower",
    "add_tower",
    "divprune_macs",
    "stage1_macs",
    "visionzip_macs",
]

#: A CLIP tower whose patch features go through a multimodal projector (salience: the [CLS] row).
CLIP = "clip"
#: A windowed ViT whose patches are merged into tokens by a patch merger (salience: received attention).
WINDOWED_VIT = "windowed_vit"
#: A ViT without windows whose patches a merger folds into tokens (Qwen2-VL, Qwen3-VL, Qwen3.5): Nüwa's
#: windowed-ViT release applies to it unchanged (its windows are only undone where the tower has them).
MERGER_VIT = "merger_vit"
TOWER_KINDS = (CLIP, WINDOWED_VIT, MERGER_VIT)


@dataclass(frozen=True)
class VisionTower:
    """A vision tower as the stage-1 cost sees it: its ``kind`` (:data:`CLIP` or :data:`WINDOWED_VIT`),
    its width ``d``, the gate quantile its release used, and ``merge`` patches per token (windowed ViT)."""

    kind: str
    width: int
    gate_quantile: float
    merge: int = 1

    def __post_init__(self) -> None:
        if self.kind not in TOWER_KINDS:
            raise ValueError(f"VisionTower(kind={self.kind!r}): allowed are {', '.join(TOWER_KINDS)}")


#: The registered towers by name (a family's name: registered by ``methods/nuwa/release.py``).
NUWA_TOWERS: dict[str, VisionTower] = {}


def add_tower(name: str, tower: VisionTower) -> None:
    """Make ``tower`` reachable by ``name`` in :func:`stage1_macs` (a different tower under a taken name
    is refused: two callers disagree on what a family's tower is)."""
    if NUWA_TOWERS.get(name, tower) != tower:
        raise ValueError(f"a different vision tower is already registered as {name!r}")
    NUWA_TOWERS[name] = tower


@dataclass(frozen=True)
class Stage1Cost:
    """Stage-1 MACs of one image, by part (see the module docstring)."""

    salience: int
    similarity: int
    aggregation: int
    low_anchors: int

    @property
    def total(self) -> int:
        return self.salience + self.similarity + self.aggregation


def stage1_macs(
    shape: ModelShape,
    family: str | VisionTower,
    n_visual: int,
    k1: int,
    gate_quantile: float | None = None,
    vision_hidden: int | None = None,
) -> Stage1Cost:
    """Stage-1 MACs for one image of ``n_visual`` tokens keeping ``k1`` anchors on a model of ``shape``
    (its decoder width is a windowed ViT's aggregation width). ``family``: a :class:`VisionTower`, or the
    name of a registered one (:data:`NUWA_TOWERS`: the families Nüwa's stage 1 is defined for)."""
    tower = family if isinstance(family, VisionTower) else NUWA_TOWERS.get(family)
    if tower is None:
        raise ValueError(f"family={family!r}: Nüwa's stage 1 is defined for {', '.join(NUWA_TOWERS)}")
    if not 1 <= k1 <= n_visual:
        raise ValueError(f"k1={k1!r}: anchors per image must be in 1..{n_visual}")
    d = tower.width if vision_hidden is None else vision_hidden
    q = tower.gate_quantile if gate_quantile is None else gate_quantile
    n = n_visual
    low = math.ceil(q * (k1 - 1)) if k1 < n else 0  # an image whose K₁ covers it skips stage 1
    if tower.kind == CLIP:
        salience = (n + 2) * d * d + (n + 1) * d
        similarity = 0
        aggregation = low * n * 2 * d + n * d if low else 0
    else:
        m = tower.merge
        patches = m * n
        salience = 3 * patches * d * d + patches * patches * d
        similarity = n * (m * d * m * d + m * d * shape.hidden_size)
        aggregation = low * n * 2 * shape.hidden_size + n * shape.hidden_size if low else 0
    return Stage1Cost(salience=salience, similarity=similarity, aggregation=aggregation, low_anchors=low)


def divprune_macs(n_visual: int, k: int, width: int) -> int:
    """DivPrune (arXiv 2503.02175) on one image of ``n_visual`` rows of ``width`` (the language model's):
    the nearest neighbours of every row (``N²·D``, by tiles), then one row of distances per later pick
    (``(k − 1)·N·D``); norms not counted. 0 when ``k`` covers the image (nothing is selected)."""
    if not 1 <= k <= n_visual:
        raise ValueError(f"k={k!r}: DivPrune keeps 1..{n_visual} tokens of an image of {n_visual}")
    return 0 if k == n_visual else n_visual * n_visual * width + (k - 1) * n_visual * width


def visionzip_macs(
    n_visual: int, dominant: int, contextual: int, tower: VisionTower, key_width: int, feature_width: int
) -> int:
    """VisionZip (arXiv 2412.04467) on one image: the salience, as Nüwa's (a CLIP tower's [CLS] row and
    keys recomputed, ``(N + 2)·d² + (N + 1)·d``; a merger tower's attention received in one block,
    ``3·P·d² + P²·d`` for ``P = merge·N`` patches), then the key cosines of the merged tokens to the
    targets (``(N − D − C)·C·h``) and their mean into the targets (``(N − D − C)·F``). 0 when every
    token is kept."""
    if dominant < 0 or contextual < 0 or not 1 <= dominant + contextual <= n_visual:
        raise ValueError(
            f"dominant={dominant}, contextual={contextual}: VisionZip keeps 1..{n_visual} tokens of an "
            f"image of {n_visual}"
        )
    if dominant + contextual == n_visual:
        return 0
    n, d = n_visual, tower.width
    if tower.kind == CLIP:
        salience = (n + 2) * d * d + (n + 1) * d
    else:
        patches = tower.merge * n
        salience = 3 * patches * d * d + patches * patches * d
    merged = n - dominant - contextual
    return salience + merged * contextual * key_width + merged * feature_width
