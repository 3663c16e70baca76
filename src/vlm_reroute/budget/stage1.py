"""The vision-side cost of Nüwa's stage 1 (arXiv 2602.02951), kept apart from the decoder budget.

Pure Python. Multiply-accumulates per image, as the decoder budget counts them, of what this
library's stage 1 computes on top of the untouched vision tower (``methods/nuwa/signals.py``,
``methods/nuwa/aggregate.py``; ``d`` the tower's width, ``N`` the image's tokens, ``K₁`` its anchors):

* **salience** — LLaVA-1.5 (CLIP): the [CLS] query row and the keys of the feature-layer block,
  recomputed from its input because the tower's own attention does not return them:
  ``(N + 2)·d² + (N + 1)·d``. Qwen2.5-VL: the attention every patch *receives* in the last block
  needs every query row: the block's ``qkv`` projection again (``3·P·d²`` for ``P = 4N`` patches)
  and ``P²·d`` scores (the last block attends over the whole image).
* **similarity** — CLIP: running sums of block outputs only (no MACs). Qwen: the patch merger on the
  averaged block outputs, ``N·(4d·4d + 4d·D)`` with ``D`` the language model's width.
* **aggregation** — the ``L = ⌈q·(K₁ − 1)⌉`` anchors below the gate quantile ``q`` (linear
  interpolation over distinct saliences) build one cosine row and one weighted sum each:
  ``L·N·(Ds + Df) + N·Ds`` (``Ds`` similarity width, ``Df`` feature width: CLIP's ``d`` for LLaVA,
  whose aggregation precedes the projector; ``D`` for Qwen, whose follows the merger).

Norms, softmax, distances and sorting are not counted (linear in ``N`` or ``L·N`` without a width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .shapes import ModelShape

__all__ = ["NUWA_TOWERS", "Stage1Cost", "stage1_macs"]

#: vision tower width and released gate quantile per family (CLIP ViT-L/14-336; Qwen2.5-VL's ViT)
NUWA_TOWERS = {"llava": (1024, 0.55), "qwen2_5_vl": (1280, 0.1)}


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
    family: str,
    n_visual: int,
    k1: int,
    gate_quantile: float | None = None,
    vision_hidden: int | None = None,
) -> Stage1Cost:
    """Stage-1 MACs for one image of ``n_visual`` tokens keeping ``k1`` anchors on a model of ``shape``
    (its decoder width is Qwen's aggregation width). ``family`` is ``"llava"`` or ``"qwen2_5_vl"``."""
    if family not in NUWA_TOWERS:
        raise ValueError(f"family={family!r}: Nüwa's stage 1 is defined for {', '.join(NUWA_TOWERS)}")
    if not 1 <= k1 <= n_visual:
        raise ValueError(f"k1={k1!r}: anchors per image must be in 1..{n_visual}")
    width, released_q = NUWA_TOWERS[family]
    d = width if vision_hidden is None else vision_hidden
    q = released_q if gate_quantile is None else gate_quantile
    n = n_visual
    low = math.ceil(q * (k1 - 1)) if k1 < n else 0  # an image whose K₁ covers it skips stage 1
    if family == "llava":
        salience = (n + 2) * d * d + (n + 1) * d
        similarity = 0
        aggregation = low * n * 2 * d + n * d if low else 0
    else:
        patches = 4 * n
        salience = 3 * patches * d * d + patches * patches * d
        similarity = n * (4 * d * 4 * d + 4 * d * shape.hidden_size)
        aggregation = low * n * 2 * shape.hidden_size + n * shape.hidden_size if low else 0
    return Stage1Cost(salience=salience, similarity=similarity, aggregation=aggregation, low_anchors=low)
