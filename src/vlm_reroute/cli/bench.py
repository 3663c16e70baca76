"""``vlm-reroute bench``: measured cost of vanilla and every method on the same input.

Warm-up rounds, then ``--repeats`` interleaved rounds (vanilla, method 1, method 2, ... in turn);
every time is reported as median (q1–q3) and every speedup as the ratio of medians with the range
the quartiles allow. A warning names the configurations whose times spread too wide to trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .app import (
    AsJson,
    Attn,
    Device,
    Dtype,
    FlopsFraction,
    Images,
    Model,
    Output,
    Ratio,
    Strict,
    Threads,
    Tier,
    app,
    budget_spec,
    check_folder,
    check_output,
    describe_budget,
    fail,
    our_warnings,
    print_json,
    threads_text,
    torch_threads,
    warn,
    write_json,
)


@app.command()
def bench(
    model: Model,
    image: Images = None,
    prompt: Annotated[str, typer.Option(help="the question")] = "Describe the image.",
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="methods to time, prune and reroute each (default: all); repeatable"),
    ] = None,
    tier: Tier = None,
    ratio: Ratio = None,
    flops_fraction: FlopsFraction = None,
    strict: Strict = False,
    repeats: Annotated[int, typer.Option(min=1, help="timed rounds (interleaved)")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="untimed warm-up rounds")] = 1,
    decode_tokens: Annotated[int, typer.Option(min=0, help="tokens for time per decode token (0: skip)")] = 8,
    ideal: Annotated[bool, typer.Option(help="also time the zero-overhead ideal (layers alone)")] = False,
    plots: Annotated[Path | None, typer.Option(help="folder for the PNG plots")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    attn: Attn = "sdpa",
    threads: Threads = None,
    as_json: AsJson = False,
    output: Output = None,
) -> None:
    """Measured prefill and decode time, memory and KV cache of vanilla and every method."""
    output = check_output(output)
    if not image:
        fail("give --image (repeat it for several images)")
    spec = budget_spec(tier, ratio, flops_fraction, strict, explicit_keep=False)
    keys = _method_keys(method)
    plots = check_folder(plots, "--plots")

    from ..bench.plots import speedup_png, tokens_per_layer_png
    from ..bench.profiler import profile
    from ..loading import LoadError, quiet_transformers
    from ..methods import method_from_spec
    from ..pipelines import pipeline

    console = Console(highlight=False)
    with quiet_transformers(), our_warnings() as shown, torch_threads(threads) as (n_threads, default):
        try:
            pipe = pipeline(model, None, dtype=dtype, device=device, attn=attn)
            inputs = pipe.inputs([(image, prompt)])
            methods = {}
            for key in keys:
                for reroute in (False, True):
                    chosen = method_from_spec(key, reroute=reroute, strict=strict, model=pipe.model, **spec)
                    methods[chosen.name] = chosen
            report = profile(
                pipe.model,
                inputs,
                methods,
                repeats=repeats,
                warmup=warmup,
                decode_tokens=decode_tokens,
                ideal=ideal,
            )
        except (LoadError, ValueError, TypeError) as exc:
            fail(str(exc))
        report.settings.update(budget=spec, threads_default=default, warnings=shown)
        data = report.to_dict()
        write_json(output, data)
        if as_json:
            print_json(data)
        else:
            console.print(f"budget: {describe_budget(spec)}; {threads_text(n_threads, default)}")
            report.print(console)
            if output is not None:
                console.print(f"JSON: {output}")
        wide = report.spread_warning()
        if wide:
            warn(wide)
        if plots is not None:
            for png in (
                tokens_per_layer_png(report, plots / "tokens_per_layer.png"),
                speedup_png(report, plots / "speedup.png"),
            ):
                if not as_json:
                    console.print(f"plot: {png}")


def _method_keys(names: list[str] | None) -> list[str]:
    """Registry keys to time (prune and reroute each): the tabulated methods by default."""
    from ..budget.solver import tabulated_methods
    from ..methods.registry import method_class

    if not names:
        return list(tabulated_methods())
    keys = []
    for name in names:
        try:
            cls, reroute = method_class(name)
        except ValueError as exc:
            fail(str(exc))
        if cls.key not in keys:
            keys.append(cls.key)
    return keys
