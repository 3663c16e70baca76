"""Pictures of routing decisions: which visual tokens each decision kept, deferred, brought back
or removed, over the original picture, with scores and the share of a target box each layer saw.

Imports matplotlib lazily (inside the drawing functions), so ``vlm_reroute.viz.states`` and
``.geometry`` stay cheap.
"""

from __future__ import annotations

from .coverage import BoxCoverage, box_coverage
from .figure import STATE_ALPHA, STATE_COLOURS, find_axes, plot_trace, trace_figure
from .geometry import Placement, placement_for
from .states import STATES, image_states, token_states

__all__ = [
    "STATES",
    "STATE_ALPHA",
    "STATE_COLOURS",
    "BoxCoverage",
    "Placement",
    "box_coverage",
    "find_axes",
    "image_states",
    "placement_for",
    "plot_trace",
    "token_states",
    "trace_figure",
]
