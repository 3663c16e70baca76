"""Pictures on tiny models: the colour drawn at every cell is the colour of the state the trace
gives that token, in the figure's canvas and in the saved PNG; titles carry the counts; batches,
several images and the GIF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from PIL import Image

import vlm_reroute as vr
from vlm_reroute.cli.explain import build_inputs
from vlm_reroute.loading import PromptBuilder, load_model
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint
from vlm_reroute.viz import STATE_ALPHA, STATE_COLOURS, find_axes, placement_for, plot_trace, trace_figure

GREY = np.array([128, 128, 128], dtype=float)
DPI = 40
# kept, re-entered, deferred, removed: the documented colours
NAMES = ("kept", "re-entered", "deferred", "removed")


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def setup(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family)
    kwargs = {"image_size": 112} if family == "llava" else {}  # 8×8 grid; Qwen: 5×7 for 200×150
    save_tiny_checkpoint(family, path, **kwargs)
    model = load_model(str(path))
    builder = PromptBuilder.from_pretrained(str(path), model)
    processor = builder.processor if builder.processor is not None else builder.image_processor
    return model, builder, processor


def run(model, inputs, method):
    with method(model) as trace, torch.no_grad():
        model(**inputs, use_cache=False)
    return trace


def expected_states(trace, sample: int, reroute: bool) -> list[list[int]]:
    """From the trace's selections, by the definitions (no code under test)."""
    out, previous = [], None
    for d in trace.decisions:
        now = set(d.selected[sample].tolist())
        row = []
        for t in range(trace.visual_tokens[sample]):
            if t in now:
                row.append(0 if previous is None or t in previous else 1)
            else:
                row.append(2 if reroute else 3)
        out.append(row)
        previous = now
    return out


def blended(state: int) -> np.ndarray:
    colour = np.array(to_rgb(STATE_COLOURS[state])) * 255
    return STATE_ALPHA[state] * colour + (1 - STATE_ALPHA[state]) * GREY


def cell_pixels(fig, buffer: np.ndarray, label: str, placement) -> np.ndarray:
    """RGB of the pixel at every cell centre of the panel ``label``, ``(rows · cols, 3)``."""
    ax = find_axes(fig, label)
    rows, cols = placement.grid
    centres = np.array([placement.cell_centre(r, c) for r in range(rows) for c in range(cols)])
    px = ax.transData.transform(centres)
    ys = (buffer.shape[0] - px[:, 1]).astype(int)
    return buffer[ys, px[:, 0].astype(int), :3].astype(float)


def check_state_colours(fig, buffer, runs, picture_sizes, layouts, processor, sample=0):
    """Every cell of every states panel has its state's colour; returns the states seen."""
    seen = set()
    for k, (trace, reroute) in enumerate(runs):
        states = expected_states(trace, sample, reroute)
        for i, lay in enumerate(layouts):
            placement = placement_for(processor, picture_sizes[i], lay)
            for d in range(len(trace.decisions)):
                pixels = cell_pixels(fig, buffer, f"states/{k}/{i}/{d}", placement)
                want = np.array([blended(s) for s in states[d][lay.offset : lay.offset + lay.length]])
                assert np.abs(pixels - want).max() <= 4, (k, i, d)
                seen |= set(states[d][lay.offset : lay.offset + lay.length])
    return seen


def canvas_of(fig) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def test_cell_colours_titles_and_png(setup, tmp_path):
    model, builder, processor = setup
    picture = Image.new("RGB", (200, 150), (128, 128, 128))
    inputs = builder(picture, "What is here?", model)
    method = vr.method_from_spec("pdrop", reroute=True, layers=[2, 4, 6], keep=[0.4, 0.4, 0.2])
    reroute, prune = run(model, inputs, method), run(model, inputs, method.replace(reroute=False))
    fig = trace_figure(reroute, picture, processor, compare=prune, dpi=DPI)
    buffer = canvas_of(fig)
    runs = [(prune, False), (reroute, True)]  # prune is drawn above reroute
    layouts = reroute.layouts[0]
    seen = check_state_colours(fig, buffer, runs, [picture.size], layouts, processor)
    assert seen == {0, 1, 2, 3}, f"states seen: {[NAMES[s] for s in sorted(seen)]}"
    for k, (trace, mode) in enumerate(runs):
        for d, decision in enumerate(trace.decisions):
            counts = np.bincount(expected_states(trace, 0, mode)[d], minlength=4)
            parts = [f"{NAMES[s]} {counts[s]}" for s in ((0, 1, 2) if mode else (0, 3))]
            title = find_axes(fig, f"states/{k}/0/{d}").get_title()
            assert title == f"layer {decision.layer}\n" + " · ".join(parts)
    # score panels: the best-scored candidate is viridis' top colour; a token removed earlier is dark
    placement = placement_for(processor, picture.size, layouts[0])
    scores = prune.decisions[1].scores[0]
    previous = prune.decisions[0].selected[0]
    pixels = cell_pixels(fig, buffer, "scores/0/0/1", placement)
    best = previous[scores[previous].argmax()]
    top = np.array(to_rgb("#fde725")) * 255 * 0.85 + 0.15 * GREY
    assert np.abs(pixels[best] - top).max() <= 6
    gone = sorted(set(range(len(scores))) - set(previous.tolist()))[0]
    assert np.abs(pixels[gone] - 0.25 * GREY).max() <= 4
    # the saved PNG has the same pixels
    (png,) = plot_trace(reroute, picture, tmp_path / "r.png", processor, compare=prune, dpi=DPI)
    saved = np.asarray(Image.open(png).convert("RGBA"))
    assert saved.shape == buffer.shape
    check_state_colours(fig, saved, runs, [picture.size], layouts, processor)


def test_batch_several_images_and_gif(setup, tmp_path):
    model, builder, processor = setup
    pictures = [Image.new("RGB", (200, 150), (128, 128, 128)), Image.new("RGB", (120, 160), (128, 128, 128))]
    inputs = build_inputs(builder, pictures, ["First?", "A longer second question?"], model)
    method = vr.method_from_spec("pdrop", reroute=True, layers=[3, 5], keep=[0.5, 0.25])
    trace = run(model, inputs, method)
    assert [len(s) for s in trace.layouts] == [2, 2]
    files = plot_trace(trace, pictures, tmp_path / "b.png", processor, dpi=DPI, scores=False, gif=True)
    assert [f.name for f in files] == ["b-sample0.png", "b-sample0.gif", "b-sample1.png", "b-sample1.gif"]
    gif = Image.open(files[1])
    assert gif.n_frames == len(trace.decisions)
    fig = trace_figure(trace, pictures, processor, sample=1, dpi=DPI, scores=False)
    buffer = canvas_of(fig)
    sizes = [p.size for p in pictures]
    seen = check_state_colours(fig, buffer, [(trace, True)], sizes, trace.layouts[1], processor, sample=1)
    assert seen >= {0, 2}
    (only,) = plot_trace(trace, pictures, tmp_path / "one.png", processor, sample=1, dpi=DPI, scores=False)
    assert only.name == "one.png" and Image.open(only).size == (buffer.shape[1], buffer.shape[0])
    with pytest.raises(ValueError, match="1 pictures for sample 0, which holds 2 images"):
        trace_figure(trace, pictures[:1], processor)
