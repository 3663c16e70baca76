"""``vlm-reroute run``: answer questions about images with a routed model, one prompt or a JSONL file.

One prompt (``--image`` repeated for several images, ``--prompt``) prints the answer, the
decisions, the KV cache and the prefill time of a single run; ``--compare`` adds the vanilla
answer and times routed and vanilla prefills over ``--repeats`` interleaved runs after a warm-up
(median and quartiles, speedup as the ratio of the medians).

Dataset mode (``--input prompts.jsonl``) answers every line, ``--batch-size`` prompts at a time,
with a progress bar, and writes one JSON line per sample (see :mod:`.dataset`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .app import (
    AsJson,
    Attn,
    Device,
    Dtype,
    FlopsFraction,
    Images,
    Keep,
    Layers,
    Method,
    Model,
    Output,
    Ratio,
    Reroute,
    Settings,
    Strict,
    Threads,
    Tier,
    WithdrawAt,
    app,
    check_output,
    fail,
    method_spec,
    our_warnings,
    print_json,
    threads_text,
    torch_threads,
    warn,
    write_json,
)
from .dataset import read_prompts, run_dataset


@app.command()
def run(
    model: Model,
    image: Images = None,
    prompt: Annotated[str | None, typer.Option(help="the question about the image(s)")] = None,
    input: Annotated[
        Path | None,
        typer.Option("--input", help="JSONL file, one prompt per line: image (path or list), prompt, box"),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per batch in dataset mode")] = 1,
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
    compare: Annotated[bool, typer.Option(help="also run vanilla: answer, KV and timed prefills")] = False,
    repeats: Annotated[int, typer.Option(min=1, help="timed prefills per configuration with --compare")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="untimed warm-up rounds with --compare")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate")] = 64,
    dtype: Dtype = "auto",
    device: Device = "auto",
    attn: Attn = "sdpa",
    threads: Threads = None,
    as_json: AsJson = False,
    output: Output = None,
) -> None:
    """Answer a question about images with a routed model; show the decisions and the cost."""
    output = check_output(output)
    if input is not None and (image or prompt is not None):
        fail("--input reads images and prompts from a JSONL file; drop --image and --prompt")
    if input is None and (not image or prompt is None):
        fail("give --image (repeat it for several images) and --prompt, or --input prompts.jsonl")
    spec = method_spec(
        method, reroute, tier, ratio, flops_fraction, strict, layers, keep, withdraw_at, settings
    )
    prompts = read_prompts(input) if input is not None else None
    pictures = None if prompts is not None or image is None else [_image(source) for source in image]

    from ..loading import LoadError, quiet_transformers
    from ..pipelines import pipeline

    with quiet_transformers(), our_warnings() as shown, torch_threads(threads) as (n_threads, default):
        try:
            pipe = pipeline(model, spec, dtype=dtype, device=device, attn=attn, max_new_tokens=max_new_tokens)
            if prompts is not None:
                run_dataset(pipe, prompts, batch_size, compare, output, model)
                return
            assert image and pictures is not None and prompt is not None  # one prompt: checked above
            report = _run_one(pipe, pictures, prompt, compare, repeats, warmup)
        except (LoadError, ValueError, TypeError, NotImplementedError) as exc:  # the profiler's refusals
            fail(str(exc))
        report.update(
            model=model,
            images=list(image),
            prompt=prompt,
            budget=spec.budget() or None,
            withdraw_at=spec.withdraw_at,
            threads=n_threads,
            warnings=shown,
        )
        write_json(output, report)
        if as_json:
            print_json(report)
        else:
            withdraw = "" if spec.withdraw_at is None else f", withdrawn from layer {spec.withdraw_at}"
            _print(report, spec.describe_budget() + withdraw, threads_text(n_threads, default))
        if report.get("spread_warning"):
            warn(report["spread_warning"])


def _image(source: str) -> Any:
    from ..images import load_image
    from ..loading import LoadError

    try:
        return load_image(source)
    except LoadError as exc:
        fail(str(exc))


def _run_one(pipe: Any, pictures: list, prompt: str, compare: bool, repeats: int, warmup: int) -> dict:
    """Answer, decisions and cost of one prompt (and vanilla's with ``compare``)."""
    import time

    import torch

    from ..engine.cache import kv_bytes
    from ..engine.compat import output_cache

    inputs = pipe.builder.batch([(pictures, prompt)], pipe.model)
    answer = pipe.generate(inputs)[0]
    method = pipe.method
    report: dict[str, Any] = {
        "method": method.name if method is not None else "vanilla",
        "method_spec": repr(method),
        "answer": answer.text,
        "visual_tokens": answer.visual_tokens,
        "avg_visual_tokens": answer.avg_visual_tokens,
        "schedule": _schedule(method, pipe.model, answer.visual_tokens),
        "decisions": answer.decisions,
    }
    if not compare:  # one warm prefill (generate ran first), labelled as a single run
        with torch.no_grad(), method(pipe.model):
            start = time.perf_counter()
            out = pipe.model(**inputs, use_cache=True)
            seconds = time.perf_counter() - start
        report["kv_bytes"] = kv_bytes(output_cache(out))
        report["prefill"] = {"median_s": seconds, "q1_s": seconds, "q3_s": seconds, "runs_s": [seconds]}
        return report
    from ..bench.profiler import profile

    timed = profile(
        pipe.model,
        inputs,
        {report["method"]: method},
        repeats=repeats,
        warmup=warmup,
        decode_tokens=0,
        memory=False,
    )
    vanilla, routed = timed.rows
    report["kv_bytes"] = routed.kv_bytes
    report["prefill"] = _prefill_json(routed)
    report["vanilla"] = {
        "answer": pipe.generate(inputs, method=None)[0].text,
        "kv_bytes": vanilla.kv_bytes,
        "prefill": _prefill_json(vanilla),
    }
    report["speedup"] = {
        "value": routed.speedup,
        "low": routed.speedup_range[0],
        "high": routed.speedup_range[1],
    }
    report["timing"] = {"repeats": repeats, "warmup": warmup, "interleaved": True}
    report["spread_warning"] = timed.spread_warning()
    return report


def _prefill_json(row: Any) -> dict[str, Any]:
    return {
        "median_s": row.prefill_s,
        "q1_s": row.prefill_iqr_s[0],
        "q3_s": row.prefill_iqr_s[1],
        "runs_s": row.prefill_runs_s,
    }


def _schedule(method: Any, model: Any, visual_tokens: list[int]) -> dict[str, Any]:
    """Decision layers and, per image, the keep counts the method runs for its token count.

    Resolved on the method bound to ``model``, as the engine runs it: on a hybrid decoder binding moves
    the default layers to layers that can score (``methods.base.fit_layers``), and the report must name
    the layers the decisions were taken at.
    """
    if method is None:
        return {"layers": [], "keep": [], "keep_per_image": []}
    from ..adapters import adapter_for
    from ..budget.shapes import ModelShape

    shape = ModelShape.from_config(model.config)
    method = method.bind(adapter_for(model))
    forms = [method.resolve(shape, n).budget_form(n) for n in visual_tokens]  # Nüwa's entry as layer 0
    layers = list(forms[0][0]) if forms else list(method.check_depth(shape.num_layers))
    per_image = [list(keep) for _, keep in forms]
    return {"layers": layers, "keep": per_image[0] if per_image else [], "keep_per_image": per_image}


def _print(report: dict[str, Any], budget: str, threads: str) -> None:
    console = Console(highlight=False)
    tokens = report["visual_tokens"]
    images = f"{len(tokens)} image{'s' * (len(tokens) != 1)}, {' + '.join(map(str, tokens))} visual tokens"
    console.print(
        f"[bold]{report['method']}[/] on {report['model']}: {images}; {budget} "
        f"(avg_T {report['avg_visual_tokens']:.1f}); {threads}"
    )
    console.print(f"[bold]answer:[/] {report['answer']}", markup=True)
    if report["decisions"]:
        table = Table(title="decisions")
        for col in ("layer", "kept", "re-entered"):
            table.add_column(col, justify="right")
        for d in report["decisions"]:
            table.add_row(str(d["layer"]), str(d["kept"]), str(d["reentered"]))
        console.print(table)
    prefill = report["prefill"]
    kv = f"KV cache {report['kv_bytes'] / 1e6:.2f} MB"
    if "vanilla" not in report:
        console.print(
            f"{kv}; prefill {prefill['median_s'] * 1e3:.1f} ms (single run; --compare times repeated "
            "interleaved runs against vanilla)"
        )
        return
    vanilla, speedup, timing = report["vanilla"], report["speedup"], report["timing"]
    console.print(f"[bold]vanilla answer:[/] {vanilla['answer']}")
    console.print(
        f"{kv} vs vanilla {vanilla['kv_bytes'] / 1e6:.2f} MB ({report['kv_bytes'] / vanilla['kv_bytes']:.0%})"
    )
    console.print(
        f"prefill ms, median (q1–q3) of {timing['repeats']} interleaved runs after {timing['warmup']} "
        f"warm-up: {report['method']} {_ms(prefill)}, vanilla {_ms(vanilla['prefill'])}; speedup "
        f"{speedup['value']:.2f}× ({speedup['low']:.2f}–{speedup['high']:.2f})"
    )


def _ms(p: dict[str, float]) -> str:
    return f"{p['median_s'] * 1e3:.1f} ({p['q1_s'] * 1e3:.1f}–{p['q3_s'] * 1e3:.1f})"
