"""An animated GIF over the decisions: one frame per decision, the same panels as the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..engine.trace import Trace


def render_frames(trace: Trace, images: Any, processor: Any, **options: Any) -> list:
    """One RGB ``PIL.Image`` per decision: the figure restricted to that decision, its states and
    scores side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from .figure import trace_figure

    frames = []
    for d in range(len(trace.decisions)):
        fig = trace_figure(trace, images, processor, decisions=[d], kinds_across=True, **options)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        frames.append(Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB"))
    return frames


def save_gif(
    trace: Trace, images: Any, processor: Any, path: str | Path, *, seconds: float = 1.2, **options: Any
) -> Path:
    """Write the frames of :func:`render_frames` to ``path`` as a looping GIF."""
    path = Path(path)
    frames = render_frames(trace, images, processor, **options)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(seconds * 1000), loop=0)
    return path
