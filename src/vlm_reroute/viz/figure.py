"""Matplotlib figures of routing decisions: states and scores per decision, over the picture.

One column of panels per decision, one block of columns per image of the sample; per run (prune
above reroute with ``compare``) a row of cell states and a row of score heat maps; with a box, a
line chart of the share of the box each decoder layer saw. Every panel draws the ORIGINAL picture
with the token grid placed on it by :mod:`.geometry`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.trace import Trace
from .coverage import BoxCoverage, box_coverage
from .geometry import Box, Placement, check_box, placement_for
from .states import MODE_STATES, REMOVED, STATES, image_states, trace_reroute

#: Colours of kept / re-entered / deferred / removed from Okabe & Ito's colour-blind-safe palette
#: (https://jfly.uni-koeln.de/color/), and their opacity over the picture: tokens that go through
#: the stage are highlighted (yellow, or vermillion when they came back), tokens that do not are
#: dimmed (blue while they wait, black once they are gone).
STATE_COLOURS = ("#F0E442", "#D55E00", "#0072B2", "#000000")
STATE_ALPHA = (0.35, 0.65, 0.65, 0.75)
SCORE_CMAP = "viridis"
NO_CANDIDATE = (0.0, 0.0, 0.0, 0.75)
RUN_COLOURS = {False: "#000000", True: "#0072B2"}


@dataclass(frozen=True)
class Run:
    """One routed prefill to draw: its trace, its display label and its mode.

    ``reroute`` picks the states its panels can show (prune: kept, removed; Reroute, arXiv
    2606.12412: kept, re-entered, deferred).
    """

    trace: Trace
    label: str
    reroute: bool


def make_runs(
    trace: Trace,
    compare: Trace | None = None,
    labels: Sequence[str] | None = None,
    reroute: bool | None = None,
) -> list[Run]:
    """The runs of a figure, prune first; labels default to the method class with its mode."""
    traces = [trace] if compare is None else [trace, compare]
    modes = [trace_reroute(trace, reroute)] + ([trace_reroute(compare)] if compare is not None else [])
    if labels is None:
        labels = [
            t.method.split("(")[0] + (" + Reroute" if m else "") for t, m in zip(traces, modes, strict=True)
        ]
    if len(labels) != len(traces):
        raise ValueError(f"labels={list(labels)!r}: give one label per trace ({len(traces)})")
    runs = [Run(t, str(label), m) for t, label, m in zip(traces, labels, modes, strict=True)]
    if compare is not None:
        first, second = runs
        if [d.layer for d in first.trace.decisions] != [d.layer for d in second.trace.decisions]:
            raise ValueError(
                "compare: the two traces decide at different layers; compare one schedule's twins"
            )
        if first.trace.visual_tokens != second.trace.visual_tokens:
            raise ValueError("compare: the two traces come from different inputs")
    return sorted(runs, key=lambda r: r.reroute)


def sample_images(images: Any, trace: Trace, sample: int) -> list:
    """The pictures of ``sample``: one picture, a list (the images of every sample) or a list of
    lists (per sample)."""
    wanted = len(trace.layouts[sample])
    if hasattr(images, "size") and not isinstance(images, list | tuple):
        images = [images]
    images = list(images)
    if images and isinstance(images[0], list | tuple):
        if len(images) != len(trace.layouts):
            raise ValueError(f"{len(images)} lists of pictures for a batch of {len(trace.layouts)} samples")
        images = list(images[sample])
    if len(images) != wanted:
        raise ValueError(f"{len(images)} pictures for sample {sample}, which holds {wanted} images")
    return images


def cell_colours(states: np.ndarray) -> np.ndarray:
    """RGBA ``(rows, cols, 4)`` of a state grid."""
    from matplotlib.colors import to_rgba_array

    palette = to_rgba_array(STATE_COLOURS)
    palette[:, 3] = STATE_ALPHA
    return palette[states]


def score_colours(scores: np.ndarray) -> np.ndarray:
    """RGBA of a score grid on a per-panel log scale (attention is heavy-tailed); NaN cells (no
    candidate) dark."""
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    finite = np.isfinite(scores) & (scores > 0)
    rgba = np.empty(scores.shape + (4,))
    rgba[:] = NO_CANDIDATE
    if finite.any():
        values = scores[finite]
        low, high = float(values.min()), float(values.max())
        norm = LogNorm(max(low, high * 1e-6), high) if high > low else Normalize(low - 1, high + 1)
        rgba[finite] = matplotlib.colormaps[SCORE_CMAP](norm(np.clip(values, norm.vmin, None)))
        rgba[finite, 3] = 0.85
    return rgba


def _draw_picture(ax, picture, placement: Placement, overlay: np.ndarray, box: Box | None) -> None:
    from matplotlib.patches import Rectangle

    width, height = placement.image_size
    x0, y0, x1, y1 = placement.frame
    ax.set_facecolor("#d9d9d9")
    ax.imshow(np.asarray(picture), extent=(0, width, height, 0), interpolation="bilinear")
    ax.imshow(overlay, extent=(x0, x1, y1, y0), interpolation="nearest")
    if (x0, y0, x1, y1) != (0, 0, width, height):  # crop or padding: show the frame the model saw
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=0.6, ec="#777777"))
    if box is not None:
        _draw_box(ax, box)
    ax.set_xlim(min(0, x0), max(width, x1))
    ax.set_ylim(max(height, y1), min(0, y0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")


def _draw_box(ax, box: Box) -> None:
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    bx0, by0, bx1, by1 = box
    rect = Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, lw=1.4, ec="white")
    rect.set_path_effects([patheffects.withStroke(linewidth=2.6, foreground="black")])
    ax.add_patch(rect)


def trace_figure(
    trace: Trace,
    images: Any,
    processor: Any,
    *,
    sample: int = 0,
    compare: Trace | None = None,
    labels: Sequence[str] | None = None,
    reroute: bool | None = None,
    box: Box | None = None,
    box_image: int = 0,
    num_layers: int | None = None,
    decisions: Sequence[int] | None = None,
    scores: bool = True,
    kinds_across: bool = False,
    panel: float = 2.2,
    dpi: float = 100,
):
    """A matplotlib ``Figure`` of ``trace``'s decisions for ``sample`` over its ``images``.

    ``processor``: the checkpoint's processor (or image processor), to place cells on the original
    pictures. ``compare``: the twin trace (same schedule, other mode), drawn prune above reroute.
    ``box``: ``(x1, y1, x2, y2)`` in pixels of image ``box_image``; adds the coverage chart over
    ``num_layers`` decoder layers. ``decisions``: indices of the decisions to draw (default all).
    Panels: each run's states (and scores) row over the decisions; ``kinds_across`` puts states
    and scores side by side instead (the GIF's frames).
    """
    from matplotlib.figure import Figure, SubFigure

    runs = make_runs(trace, compare, labels, reroute)
    pictures = sample_images(images, trace, sample)
    layouts = trace.layouts[sample]
    placements = [placement_for(processor, p.size, lay) for p, lay in zip(pictures, layouts, strict=True)]
    if box is not None:
        box = _box_on_picture(box, box_image, pictures, sample)
    shown = list(range(len(trace.decisions))) if decisions is None else list(decisions)
    grids = [[image_states(r.trace, sample, i, r.reroute) for i in range(len(layouts))] for r in runs]
    coverage = (
        [box_coverage(r.trace, sample, box_image, placements[box_image], box, num_layers) for r in runs]
        if box is not None
        else None
    )

    kinds = ("states", "scores") if scores else ("states",)
    # panels: (run, kind) down and decisions across; a GIF frame (kinds_across) puts kinds across
    n_rows, n_cols = (
        (len(runs), len(kinds) * len(shown)) if kinds_across else (len(runs) * len(kinds), len(shown))
    )
    chart_height = panel * 1.2 if coverage else 0.0
    width = max(panel * n_cols * len(pictures) + 0.8, 5.0)
    fig = Figure(figsize=(width, panel * n_rows + 1.0 + chart_height), dpi=dpi, layout="constrained")
    area: Figure | SubFigure = fig
    if coverage:
        area, chart_area = fig.subfigures(
            2, 1, squeeze=False, height_ratios=[panel * n_rows + 0.6, chart_height]
        )[:, 0]
    columns = area.subfigures(1, len(pictures), squeeze=False)[0]
    for i, (column, picture, placement) in enumerate(zip(columns, pictures, placements, strict=True)):
        axes = column.subplots(n_rows, n_cols, squeeze=False)
        if len(pictures) > 1:
            column.suptitle(f"image {i}: {picture.size[0]}×{picture.size[1]} px", fontsize=8)
        for k, j, (c, d) in itertools.product(range(len(runs)), range(len(kinds)), enumerate(shown)):
            row, col = (k, c * len(kinds) + j) if kinds_across else (k * len(kinds) + j, c)
            ax, cells = axes[row, col], grids[k][i]
            ax.set_label(f"{kinds[j]}/{k}/{i}/{d}")
            if kinds[j] == "states":
                overlay, title = cell_colours(cells.states[d].numpy()), cells.title(d)
            else:
                overlay, title = score_colours(cells.scores[d].numpy()), f"layer {cells.layers[d]} scores"
            _draw_picture(ax, picture, placement, overlay, box if i == box_image else None)
            ax.set_title(title, fontsize=7)
            if col == 0:
                ax.set_ylabel(runs[k].label + ("" if kinds_across else f"\n{kinds[j]}"), fontsize=7)
    _draw_state_legend(fig, runs, scores, width)
    if coverage and box is not None:  # coverage is measured only for a box
        marker = trace.decisions[shown[0]].layer if decisions is not None and len(shown) == 1 else None
        _coverage_chart(chart_area, runs, coverage, box, box_image, marker)
    return fig


def _box_on_picture(box: Box, box_image: int, pictures: list, sample: int) -> Box:
    """``box`` checked against picture ``box_image`` of the sample (which must exist)."""
    if not 0 <= box_image < len(pictures):
        raise ValueError(f"box_image={box_image}: sample {sample} holds images 0..{len(pictures) - 1}")
    return check_box(box, pictures[box_image].size)


def _draw_state_legend(fig, runs: list[Run], scores: bool, width: float) -> None:
    """The legend above the panels: only the states the runs' modes can show (prune: kept / removed,
    reroute: kept / re-entered / deferred, and removed after a vision-side stage at layer 0), plus the
    no-candidate colour when scores of tokens that were no candidates are drawn."""
    from matplotlib.patches import Patch

    staged = any(r.trace.decisions and r.trace.decisions[0].layer == 0 for r in runs)
    shown_states = sorted(
        {s for r in runs for s in MODE_STATES[r.reroute]} | ({REMOVED} if staged else set())
    )
    handles = [
        Patch(fc=STATE_COLOURS[s], alpha=STATE_ALPHA[s], ec="none", label=STATES[s]) for s in shown_states
    ]
    if scores and (staged or not all(r.reroute for r in runs)):
        handles.append(Patch(fc=NO_CANDIDATE, label="no candidate (scores)"))
    ncols = min(len(handles), max(1, int(width / 1.3)))
    fig.legend(handles=handles, loc="outside upper center", ncols=ncols, fontsize=7, frameon=False)


def _coverage_chart(
    area, runs: list[Run], coverage: list[BoxCoverage], box: Box, image: int, marker: int | None
) -> None:
    ax = area.subplots()
    ax.set_label("coverage")
    layers = np.arange(len(coverage[0].box))
    for run, cov in zip(runs, coverage, strict=True):
        ax.step(
            layers, cov.box * 100, where="post", color=RUN_COLOURS[run.reroute], label=f"{run.label}: box"
        )
    ax.step(
        layers, coverage[0].tokens * 100, where="post", color="#999999", ls="--", label="all visual tokens"
    )
    for d in runs[0].trace.decisions:
        ax.axvline(d.layer, color="#dddddd", lw=0.8, zorder=0)
    if marker is not None:
        ax.axvline(marker, color="#D55E00", lw=1.2)
    ax.set_ylim(0, 105)
    ax.set_xlim(0, max(len(layers) - 1, 1))
    ax.set_xlabel("decoder layer", fontsize=7)
    ax.set_ylabel("% seen by the layer", fontsize=7)
    ax.tick_params(labelsize=7)
    where = f"image {image}, " if len(runs[0].trace.layouts[0]) > 1 else ""
    ax.set_title(
        f"box {','.join(f'{v:g}' for v in box)} ({where}{coverage[0].cells} cells): share each layer saw",
        fontsize=7,
    )
    ax.legend(fontsize=6, loc="lower left", frameon=False)


def find_axes(fig, label: str):
    """The axes labelled ``label`` (``"states/<run>/<image>/<decision>"``, ``"scores/..."``,
    ``"coverage"``) anywhere in ``fig``'s subfigures."""
    stack = [fig]
    while stack:
        node = stack.pop()
        for ax in node.axes:
            if ax.get_label() == label:
                return ax
        stack.extend(getattr(node, "subfigs", []))
    raise KeyError(label)


def sample_path(path: Path, sample: int, samples: int) -> Path:
    """``routing.png`` for one sample, ``routing-sample<i>.png`` when a batch is drawn."""
    return path if samples == 1 else path.with_name(f"{path.stem}-sample{sample}{path.suffix}")


def plot_trace(
    trace: Trace,
    images: Any,
    path: str | Path,
    processor: Any,
    *,
    sample: int | None = None,
    gif: bool = False,
    **options: Any,
) -> list[Path]:
    """Save :func:`trace_figure` to ``path`` (one file per sample of a batch unless ``sample`` is
    given) and, with ``gif``, an animation over the decisions next to it. Returns the files."""
    from .animation import save_gif

    path = Path(path)
    samples = range(len(trace.layouts)) if sample is None else [sample]
    written = []
    for s in samples:
        target = sample_path(path, s, len(samples))
        fig = trace_figure(trace, images, processor, sample=s, **options)
        fig.savefig(target, dpi=fig.dpi)
        written.append(target)
        if gif:
            written.append(
                save_gif(trace, images, processor, target.with_suffix(".gif"), sample=s, **options)
            )
    return written
