"""``vlm-reroute explain``: pictures of one routed prefill, decision by decision.

Runs the prompt once (prefill only: the decisions are made there), then draws which visual tokens
each decision kept, deferred, brought back or removed, over the original pictures, with the
scores; ``--compare`` runs the same schedule in the other mode and draws prune above reroute;
``--box`` reports the share of a target box each decoder layer saw. The budget options and
their defaults are ``run``'s and ``bench``'s. Registered on the app by one import at the end of
``cli/app.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import (
    Attn,
    Device,
    Dtype,
    FlopsFraction,
    Keep,
    Layers,
    Method,
    Model,
    Ratio,
    Reroute,
    Settings,
    Strict,
    Tier,
    WithdrawAt,
    app,
    check_output,
    console,
    fail,
    method_spec,
    our_warnings,
    print_json,
)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` (pixels of the original image) → a tuple, or one clear error."""
    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
        fail(f"--box {text!r}: give x1,y1,x2,y2 in pixels of the original image with x1 < x2 and y1 < y2")
    return values


def build_inputs(builder: Any, pictures: list, prompts: list[str], model: Any) -> dict:
    """A batch: one sample per prompt, each holding every picture, in the checkpoint's format (the
    prompt builder every command uses: processor, or tokenizer + image processor where the family's
    processor needs torchvision)."""
    return builder.batch([(pictures, prompt) for prompt in prompts], model)


def _prefill_trace(model: Any, inputs: dict, method: Any) -> Any:
    import torch

    with method(model) as trace, torch.no_grad():
        model(**inputs, use_cache=False)
    return trace


def _report(runs, pictures, processor, sample: int, box, box_image: int, num_layers: int) -> dict:
    """Counts per decision for every image and run, and the box coverage, for ``--json``."""
    from ..viz.coverage import box_coverage
    from ..viz.geometry import placement_for
    from ..viz.states import STATES, image_states

    first = runs[0][1]
    images = []
    for i, (picture, layout) in enumerate(zip(pictures, first.layouts[sample], strict=True)):
        placement = placement_for(processor, picture.size, layout)
        per_run = {}
        for label, trace, reroute in runs:
            cells = image_states(trace, sample, i, reroute)
            per_run[label] = [
                {"layer": layer, **dict(zip(STATES, counts, strict=True))}
                for layer, counts in zip(cells.layers, cells.counts().tolist(), strict=True)
            ]
        images.append(
            {
                "image": i,
                "size": list(picture.size),
                "grid": list(layout.grid),
                "frame": [round(v, 3) for v in placement.frame],
                "placement": placement.how,
                "decisions": per_run,
            }
        )
    out: dict[str, Any] = {"sample": sample, "images": images}
    if box is not None:
        placement = placement_for(processor, pictures[box_image].size, first.layouts[sample][box_image])
        coverage = {
            label: box_coverage(trace, sample, box_image, placement, box, num_layers)
            for label, trace, _ in runs
        }
        out["box"] = {
            "image": box_image,
            "pixels": list(box),
            "cells": next(iter(coverage.values())).cells,
            "rule": "a cell is in the box when >= 50% of its area is; share = box cells seen / box cells",
            "layers": list(range(num_layers)),
            "runs": {label: cov.to_json() for label, cov in coverage.items()},
        }
    return out


def _print_box(report: dict, decision_layers: list[int]) -> None:
    box = report.get("box")
    if not box:
        return
    console.print(
        f"sample {report['sample']}: box {box['pixels']} ({box['cells']} cells), share each layer saw:"
    )
    for label, cov in box["runs"].items():
        steps = " → ".join(f"{cov['box_share'][layer]:.0%} (L{layer})" for layer in decision_layers)
        console.print(f"  {label}: 100% → {steps}")


@app.command()
def explain(
    model: Model,
    image: Annotated[list[str], typer.Option(help="image path or URL; repeat for several images per prompt")],
    prompt: Annotated[list[str], typer.Option(help="the question; repeat for a batch (one sample each)")],
    method: Method = "pdrop",
    reroute: Reroute = True,
    tier: Tier = None,
    ratio: Ratio = None,
    flops_fraction: FlopsFraction = None,
    strict: Strict = False,
    layers: Layers = None,
    keep: Keep = None,
    withdraw_at: WithdrawAt = None,
    settings: Settings = None,
    out: Annotated[
        str, typer.Option(help="PNG to write (a batch writes <stem>-sample<i>.png)")
    ] = "routing.png",
    compare: Annotated[bool, typer.Option(help="also run the same schedule in the other mode")] = False,
    gif: Annotated[
        bool, typer.Option(help="also write an animation over the decisions (<stem>.gif)")
    ] = False,
    box: Annotated[str | None, typer.Option(help="target box x1,y1,x2,y2 in original pixels")] = None,
    box_image: Annotated[int, typer.Option(help="which image of the prompt --box is on")] = 0,
    sample: Annotated[int | None, typer.Option(help="draw only this sample of the batch")] = None,
    scores: Annotated[bool, typer.Option("--scores/--no-scores", help="draw the score heat maps")] = True,
    dpi: Annotated[float, typer.Option(help="resolution of the pictures")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print the counts and box shares as JSON")] = False,
    dtype: Dtype = "auto",
    device: Device = "auto",
    attn: Attn = "sdpa",
) -> None:
    """Pictures of the routing: which visual tokens each decision kept, deferred, brought back or removed."""
    out_path = check_output(Path(out), "--out")  # first: the model runs before anything is written
    target = parse_box(box)
    if sample is not None and not 0 <= sample < len(prompt):
        fail(f"--sample {sample}: the batch has {len(prompt)} prompts (samples 0..{len(prompt) - 1})")
    spec = method_spec(
        method, reroute, tier, ratio, flops_fraction, strict, layers, keep, withdraw_at, settings
    )
    from ..comparison import prune_and_reroute
    from ..loading import LoadError, quiet_transformers

    drawing = Drawing(target, box_image, sample, scores, dpi, gif)
    with quiet_transformers(), our_warnings():
        try:
            loaded, builder, pictures = _load(model, image, dtype, device, attn)
            inputs = build_inputs(builder, pictures, prompt, loaded)
            chosen = spec.build(loaded)
            runs = [
                (label, _prefill_trace(loaded, inputs, m), m.reroute)
                for label, m in prune_and_reroute(chosen, compare, loaded, inputs)
            ]
            result = _draw(runs, loaded, builder, pictures, out_path, drawing, len(prompt))
        except (LoadError, ValueError, TypeError) as exc:
            fail(str(exc))
    if as_json:
        result["samples"] = [{**r, "prompt": prompt[r["sample"]]} for r in result["samples"]]
        print_json({"model": model, **result})
        return
    for f in result["files"]:
        console.print(f"wrote {f}")
    for r in result["samples"]:
        _print_box(r, result["decision_layers"])


@dataclass(frozen=True)
class Drawing:
    """The drawing options of ``vlm-reroute explain``, passed whole so that its steps stay short."""

    box: tuple[float, float, float, float] | None
    box_image: int
    sample: int | None
    scores: bool
    dpi: float
    gif: bool


def _load(model: str, image: list[str], dtype: str, device: str, attn: str) -> tuple[Any, Any, list]:
    """The pictures (first: a bad path fails before the model loads), the model and its prompt builder."""
    from ..images import load_image
    from ..loading import PromptBuilder, load_model

    pictures = [load_image(source) for source in image]
    loaded = load_model(model, dtype=dtype, device=device, attn=attn)
    return loaded, PromptBuilder.from_pretrained(model, loaded), pictures


def _draw(
    runs: list, model: Any, builder: Any, pictures: list, out: Path, drawing: Drawing, n_prompts: int
) -> dict[str, Any]:
    """Write the pictures of ``runs``; return the report ``--json`` prints (without the model)."""
    from ..adapters import adapter_for
    from ..viz.figure import plot_trace

    processor = builder.processor if builder.processor is not None else builder.image_processor
    num_layers = len(adapter_for(model).layers)
    trace, twin = runs[0][1], (runs[1][1] if len(runs) > 1 else None)
    files = plot_trace(
        trace,
        pictures,
        out,
        processor,
        sample=drawing.sample,
        gif=drawing.gif,
        compare=twin,
        labels=[r[0] for r in runs],
        reroute=runs[0][2],
        box=drawing.box,
        box_image=drawing.box_image,
        num_layers=num_layers,
        scores=drawing.scores,
        dpi=drawing.dpi,
    )
    samples = range(n_prompts) if drawing.sample is None else [drawing.sample]
    return {
        "methods": [r[0] for r in runs],
        "decision_layers": [d.layer for d in trace.decisions],
        "num_layers": num_layers,
        "files": [str(f) for f in files],
        "samples": [
            _report(runs, pictures, processor, s, drawing.box, drawing.box_image, num_layers) for s in samples
        ],
    }
