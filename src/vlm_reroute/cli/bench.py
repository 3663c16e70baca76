"""``vlm-reroute bench``: measured cost of vanilla and every method on the same input.

Warm-up rounds, then ``--repeats`` interleaved rounds (vanilla, method 1, method 2, ... in turn);
every time is reported as median (q1–q3) and every speedup as the ratio of medians with the range
the quartiles allow. A warning names the configurations whose times spread too wide to trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
    WithdrawAt,
    app,
    check_folder,
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

if TYPE_CHECKING:
    from ..methods.spec import MethodSpec


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
    withdraw_at: WithdrawAt = None,
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
    specs = _specs(method, tier, ratio, flops_fraction, strict, withdraw_at)
    plots = check_folder(plots, "--plots")

    from ..bench.plots import speedup_png, tokens_per_layer_png
    from ..bench.profiler import profile
    from ..loading import LoadError, quiet_transformers
    from ..pipelines import pipeline

    console = Console(highlight=False)
    with quiet_transformers(), our_warnings() as shown, torch_threads(threads) as (n_threads, default):
        try:
            pipe = pipeline(model, None, dtype=dtype, device=device, attn=attn)
            inputs = pipe.inputs([(image, prompt)])
            built = {spec.name: spec.build(pipe.model) for spec in specs}
            methods = {name: routed for name, routed in built.items() if routed is not None}
            report = profile(
                pipe.model,
                inputs,
                methods,
                repeats=repeats,
                warmup=warmup,
                decode_tokens=decode_tokens,
                ideal=ideal,
            )
        except (LoadError, ValueError, TypeError, NotImplementedError) as exc:
            fail(str(exc))
        report.settings.update(budget=specs[0].budget(), threads_default=default, warnings=shown)
        report.settings.update(withdraw_at=withdraw_at)
        data = report.to_dict()
        write_json(output, data)
        if as_json:
            print_json(data)
        else:
            console.print(f"budget: {specs[0].describe_budget()}; {threads_text(n_threads, default)}")
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


def _specs(
    names: list[str] | None,
    tier: float | None,
    ratio: float | None,
    flops_fraction: float | None,
    strict: bool,
    withdraw_at: int | None = None,
) -> list[MethodSpec]:
    """Each method to time, prune and reroute (default: the tabulated methods), with the budget options;
    a method named twice (``pdrop`` and ``pdrop+reroute``) is timed once."""
    from ..budget.solver import tabulated_methods

    specs: list[MethodSpec] = []
    for name in names or tabulated_methods():
        spec = method_spec(name, False, tier, ratio, flops_fraction, strict, withdraw_at=withdraw_at)
        for twin in (spec.replace(reroute=False), spec.replace(reroute=True)):
            if twin not in specs:
                specs.append(twin)
    return specs
