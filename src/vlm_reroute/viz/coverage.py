"""The grounding number: per decoder layer, the share of a target box's cells the layer saw.

Rule (documented in docs/pictures.md): a grid cell belongs to the box when at least half of its
area, on the original picture, lies inside the box. Layer ``j`` *saw* a cell when the cell's
visual token went through layer ``j``: every token before the first decision, the tokens
selected by the last decision at or before ``j`` afterwards. Share = |box cells seen by ``j``| /
|box cells|. Under prune the share can only fall; under reroute the box can come back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine.trace import Trace
from .geometry import Box, Placement
from .states import image_cells, selection


@dataclass(frozen=True)
class BoxCoverage:
    """Per decoder layer: ``box`` share seen, and ``tokens`` share of the image's tokens seen.

    It measures the project's claim (Reroute, arXiv 2606.12412): pruning loses where things are,
    rerouting can bring a box back at the same budget. The rule is the module docstring's.

    Attributes
    ----------
    box : ndarray
        Per layer: the share of the box's cells the layer saw.
    tokens : ndarray
        Per layer: the share of the image's visual tokens the layer saw.
    cells : int
        Grid cells that belong to the box.
    """

    box: np.ndarray
    tokens: np.ndarray
    cells: int

    def to_json(self) -> dict:
        return {"box_share": self.box.round(6).tolist(), "token_share": self.tokens.round(6).tolist()}


def stage_of_layer(layers: list[int] | tuple[int, ...], num_layers: int) -> np.ndarray:
    """Per decoder layer: the index of the decision in force (-1 before the first decision)."""
    return np.searchsorted(np.asarray(layers), np.arange(num_layers), side="right") - 1


def box_coverage(
    trace: Trace, sample: int, image: int, placement: Placement, box: Box, num_layers: int | None = None
) -> BoxCoverage:
    """Share of ``box``'s cells (≥ 50 % area overlap) each of ``num_layers`` layers saw (default:
    up to the last decision layer)."""
    in_box = torch.from_numpy(placement.box_cells(box))
    cells = int(in_box.sum())
    if cells == 0:
        xs, ys = placement.cell_edges()
        raise ValueError(
            f"box {','.join(f'{v:g}' for v in box)} covers no cell by at least half of its area (cells are "
            f"{xs[1] - xs[0]:.1f}×{ys[1] - ys[0]:.1f} px of the original image); draw a larger box"
        )
    layout = trace.layouts[sample][image]
    seen = image_cells(selection(trace, sample).to(torch.long), layout).bool()
    per_decision_box = (seen & in_box).flatten(1).sum(1).double() / cells
    per_decision_tokens = seen.flatten(1).sum(1).double() / layout.length
    layers = [d.layer for d in trace.decisions]
    depth = num_layers if num_layers is not None else layers[-1] + 1
    if depth <= layers[-1]:
        raise ValueError(f"num_layers={depth}: the trace decides at layer {layers[-1]}")
    stage = torch.from_numpy(stage_of_layer(layers, depth))
    ones = torch.ones(depth, dtype=torch.double)
    box_share = torch.where(stage >= 0, per_decision_box[stage.clamp(min=0)], ones)
    token_share = torch.where(stage >= 0, per_decision_tokens[stage.clamp(min=0)], ones)
    return BoxCoverage(box_share.numpy(), token_share.numpy(), cells)
