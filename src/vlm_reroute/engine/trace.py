"""What a routed prefill decided, for inspection, tests and pictures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.layout import ImageLayout


@dataclass
class Decision:
    """One decision of one routed prefill: the visual tokens each sample's stage runs.

    Under prune (FastV, arXiv 2403.06764; PyramidDrop, arXiv 2410.17247) a decision selects among
    the tokens the previous stage ran; under reroute (arXiv 2606.12412) every visual token competes
    again, so a token deferred earlier can re-enter.

    Attributes
    ----------
    layer : int
        The decoder layer at which the stage starts.
    selected : list of Tensor
        ``selected[b]``: sorted indices into sample ``b``'s visual tokens (0-based, in sequence
        order over all its images) that go through the layers of this stage.
    scores : list of Tensor
        ``scores[b]``: the score of every visual token of sample ``b`` (0 for tokens that were not
        candidates).
    reentered : list of int
        ``reentered[b]``: selected tokens that were not selected at the previous decision (always 0
        under prune and at the first decision).
    """

    layer: int
    selected: list[torch.Tensor]
    scores: list[torch.Tensor]
    reentered: list[int]

    @property
    def kept(self) -> list[int]:
        return [int(s.numel()) for s in self.selected]


@dataclass
class Trace:
    """What a method's context manager recorded, for inspection, tests, cost reports and pictures.

    ``decisions`` and ``layouts`` (per sample, per image) cover the most recent complete prefill
    (one that raised leaves them as they were; with several threads, the one that completed last).

    Attributes
    ----------
    method : str
        The ``repr`` of the method that routed.
    decisions : list of Decision
        The decisions of the last prefill, in layer order.
    visual_tokens : list of int
        Visual tokens of each sample in the prompt (before any decision).
    layouts : list of list of ImageLayout
        Per sample, per image: its tokens' numbering and span in the sequence.
    stage1 : list of list
        Per sample, per image: what a vision-side stage decided (Nüwa's stage 1, arXiv 2602.02951;
        empty otherwise). Such a stage is also ``decisions[0]``, at layer 0.
    prefills : int
        Prefills that made decisions (a ``use_cache=False`` generate makes them once).
    """

    method: str
    decisions: list[Decision] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    layouts: list[list[ImageLayout]] = field(default_factory=list)
    stage1: list[list[Any]] = field(default_factory=list)
    prefills: int = 0

    def tokens_per_layer(self, num_layers: int, sample: int = 0) -> list[int]:
        """Visual tokens of ``sample`` that went through each decoder layer in the last prefill."""
        counts = [self.visual_tokens[sample]] * num_layers
        for d in self.decisions:
            counts[d.layer :] = [d.kept[sample]] * (num_layers - d.layer)
        return counts
