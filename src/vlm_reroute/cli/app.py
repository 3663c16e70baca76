"""The ``vlm-reroute`` command: the typer app, one-line errors, the options commands share, ``--version``.

Each command is one module of this package (``budget.py``, ``run.py``, ``bench.py``, ...) that
decorates its function with ``@app.command()``; the ``command_module(...)`` lines at the end of
this file register them. Every error a person can cause (a usage error included) prints one line
``error: ...`` on stderr and exits with status 1. Heavy imports (torch, transformers) happen
inside the commands that load a model, so ``budget`` and ``--help`` answer instantly.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, overload

import typer
from rich.console import Console
from typer.core import TyperGroup

from .. import __version__
from ..methods.spec_parsing import DEFAULT_RATIO
from ..versions import report_lines

if TYPE_CHECKING:
    from ..methods.spec import MethodSpec

try:  # recent typer vendors click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    # click's own classes under the same names: a version-dependent import mypy cannot follow
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]
Abort = getattr(typer, "Abort", RuntimeError)


class OneLineErrors(TyperGroup):
    """The command group: usage errors (unknown option, bad value, missing option) as one line, status 1.

    It exists for the command line's error contract: every failure is one ``error:`` line on stderr
    and exit status 1, never click's usage block or a traceback.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(
                args, prog_name, complete_var, False, windows_expand_args=windows_expand_args, **extra
            )
        except NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            code = 0
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            _print_error(exc.format_message() + hint)
            code = 1
        except Abort:
            _print_error("aborted")
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Visual-token pruning and recoverable routing for Hugging Face VLMs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        try:
            installed = version("vlm-reroute")
        except PackageNotFoundError:
            installed = __version__
        typer.echo(f"vlm-reroute {installed}")
        for line in report_lines():
            typer.echo(line)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Visual-token pruning and recoverable routing for Hugging Face VLMs."""


# ---- one-line messages -------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _print_error(message: str) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)


def fail(message: str) -> NoReturn:
    """One clear line on stderr and exit status 1, never a traceback."""
    _print_error(message)
    raise typer.Exit(1)


def warn(message: str) -> None:
    typer.echo(f"warning: {_one_line(message)}", err=True)


def is_ours(category: type[Warning]) -> bool:
    """A warning class this package defines (e.g. ``UnreachableTargetWarning``)."""
    module = category.__module__
    return module == "vlm_reroute" or module.startswith("vlm_reroute.")


@contextmanager
def our_warnings(seen: list[str] | None = None) -> Iterator[list[str]]:
    """Show this package's warnings (an unreachable budget clamped, ...) as one line each, once;
    silence other libraries' warnings. Yields the list of messages shown (for JSON reports).

    "Ours" is decided by the warning's class (defined in ``vlm_reroute``), not by the file it is
    attributed to: a library's deprecation warning raised with ``stacklevel`` points at our code
    that called it, and is still not a message for the person at the command line."""
    shown = [] if seen is None else seen
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
            text = _one_line(str(message))
            if is_ours(category) and text not in shown:
                shown.append(text)
                warn(text)

        warnings.showwarning = show
        yield shown


# ---- shared options ------------------------------------------------------------------------------

Model = Annotated[str, typer.Option("--model", help="Hub id or local model folder")]
Images = Annotated[
    list[str] | None, typer.Option("--image", help="image path or http(s) URL; repeat for several images")
]
Method = Annotated[
    str,
    typer.Option(
        help="a registered method: fastv, pdrop, random, sparsevlm, dart, nuwa, visionzip, divprune, or a "
        "stage-1 method + an in-decoder one, e.g. visionzip+pdrop"
    ),
]
Reroute = Annotated[bool, typer.Option("--reroute/--prune", help="recoverable routing, or removal for good")]
Tier = Annotated[
    float | None, typer.Option(help="budget: mean visual tokens per decoder layer (avg_T), e.g. 64")
]
Ratio = Annotated[
    float | None,
    typer.Option(
        help=f"budget: fraction of visual tokens kept on average over the layers (default {DEFAULT_RATIO})"
    ),
]
FlopsFraction = Annotated[
    float | None, typer.Option(help="budget: fraction of the decoder's prefill FLOPs, e.g. 0.25")
]
Strict = Annotated[
    bool, typer.Option(help="an unreachable budget is an error (default: use the nearest reachable one)")
]
Layers = Annotated[str | None, typer.Option(help="decision layers, e.g. 2,7,15,23")]
Keep = Annotated[
    str | None, typer.Option(help="tokens kept per image and stage, e.g. 46,46,23,12 or 0.5,0.25")
]
WithdrawAt = Annotated[
    int | None,
    typer.Option(
        help="VTW: no visual token runs from this decoder layer on (after the last decision layer, "
        "before the last layer), e.g. 28"
    ),
]
Settings = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="a setting of the method, NAME=VALUE; repeat for several. E.g. k=0.25 (VisionZip, DivPrune: "
        "tokens per image entering the language model), variant=v2.0 (SparseVLM), image_pivots=8 (DART)",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON on stdout instead of tables")]
Output = Annotated[Path | None, typer.Option(help="also write the JSON report to this file")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps")]
Attn = Annotated[str, typer.Option(help="attention implementation: sdpa, eager, flash_attention_2")]
Threads = Annotated[
    int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's own choice)")
]


def method_spec(
    method: str,
    reroute: bool,
    tier: float | None,
    ratio: float | None,
    flops_fraction: float | None,
    strict: bool,
    layers: str | None = None,
    keep: str | None = None,
    withdraw_at: int | None = None,
    settings: list[str] | None = None,
) -> MethodSpec:
    """The method the options ask for (``--method``, ``--reroute/--prune``, a budget or ``--layers``
    with ``--keep``, ``--withdraw-at``, ``--set``), parsed and checked by
    :meth:`MethodSpec.from_options` before any work: a bad value is one line naming the option."""
    from ..methods.spec import MethodSpec

    try:
        return MethodSpec.from_options(
            method,
            reroute,
            tier=tier,
            ratio=ratio,
            flops_fraction=flops_fraction,
            strict=strict,
            layers=layers,
            keep=keep,
            withdraw_at=withdraw_at,
            settings=settings,
        )
    except (ValueError, TypeError) as exc:
        fail(str(exc))


def budget_spec(
    tier: float | None, ratio: float | None, flops_fraction: float | None, strict: bool, explicit_keep: bool
) -> dict[str, Any]:
    """The budget options alone, as keywords (``{"tier": 64}``), for commands that build no single
    method (``budget``, ``demo``); checked as :meth:`MethodSpec.from_options` checks them."""
    from ..methods.spec_parsing import option_budget

    try:
        return option_budget(tier, ratio, flops_fraction, strict, explicit_keep)
    except ValueError as exc:
        fail(str(exc))


def withdraw_option(withdraw_at: int | None, num_layers: int | None = None) -> int | None:
    """``--withdraw-at`` for commands that build no single method (``budget``, ``demo``): a layer
    index ≥ 1, checked before any work; with ``num_layers``, also after the last default decision
    layer of every tabulated method (prune and reroute) and before the last layer (``budget``)."""
    from ..methods.spec_parsing import option_withdraw

    try:
        option_withdraw(withdraw_at)
    except ValueError as exc:
        fail(str(exc))
    if withdraw_at is None or num_layers is None:
        return withdraw_at
    from ..budget.solver import default_layers, rule_for, tabulated_methods

    pairs = [(k, r) for k in tabulated_methods() for r in (False, True)]
    last, key, reroute = max((max(default_layers(k, num_layers, r), default=0), k, r) for k, r in pairs)
    if not last < withdraw_at < num_layers:
        fail(
            f"--withdraw-at {withdraw_at}: the last decision layer of the methods is {last} "
            f"({rule_for(key, reroute)[0].label(reroute)}) and this decoder has {num_layers} layers, "
            f"so --withdraw-at must be in {last + 1}..{num_layers - 1}"
        )
    return withdraw_at


def describe_budget(spec: dict[str, Any]) -> str:
    """``avg_T = 64`` for ``{"tier": 64}`` (``MethodSpec.describe_budget`` for a whole spec)."""
    from ..methods.spec import describe_budget

    return describe_budget(spec)


@overload
def check_output(path: Path, what: str = ...) -> Path: ...
@overload
def check_output(path: None, what: str = ...) -> None: ...
@overload
def check_output(path: Path | None, what: str = ...) -> Path | None: ...
def check_output(path: Path | None, what: str = "--output") -> Path | None:
    """Fail now, before any work, if ``path`` cannot be written (missing or read-only folder)."""
    if path is None:
        return None
    path = path.expanduser()
    folder = path.parent
    if path.is_dir():
        fail(f"{what} {str(path)!r} is a folder; give a file name")
    if not folder.is_dir():
        fail(f"{what} {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"{what} {str(path)!r}: not writable")
    return path


def check_folder(path: Path | None, what: str) -> Path | None:
    """Create an output folder now (before any work), or fail with one line."""
    if path is None:
        return None
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{what} {str(path)!r}: cannot create the folder ({exc.strerror or exc})")
    if not os.access(path, os.W_OK):
        fail(f"{what} {str(path)!r}: not writable")
    return path


@contextmanager
def torch_threads(threads: int | None) -> Iterator[tuple[int, bool]]:
    """Set torch's CPU threads for the command (restored after); yields ``(threads, is_default)``."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads(), threads is None
    finally:
        torch.set_num_threads(before)


def threads_text(threads: int, default: bool) -> str:
    return f"{threads} thread{'s' * (threads != 1)} ({'torch default' if default else '--threads'})"


def print_json(data: Any) -> None:
    import json

    typer.echo(json.dumps(data, indent=2))


def write_json(path: Path | None, data: Any) -> None:
    import json

    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---- the console explain and eval print with -----------------------------------------------

console = Console(highlight=False)


# ---- commands: one module each -----------------------------------------------------------------


def command_module(name: str) -> None:
    """Register the command(s) that ``vlm_reroute.cli.<name>`` defines with ``@app.command()``."""
    importlib.import_module(f"{__package__}.{name}")


command_module("budget")
command_module("run")
command_module("bench")
command_module("explain")
command_module("eval")
command_module("demo")
