"""``python -m vlm_reroute.eval ARGS``: ``python -m lmms_eval ARGS`` that fails loudly.

lmms-eval 0.7 catches every exception of an evaluation (a missing task, a model that cannot load, an
import that breaks), logs it and exits with status 0 without writing results; scripts and CI then
take a failed run for a finished one. This runs lmms-eval unchanged, its output passed through as it
comes, and judges the run by what it left: a new ``*_results.json`` under ``--output_path`` (when
given) and no ``Error during evaluation`` in its log. A failed run ends with one ``error:`` line on
stderr and exit status 1; listing tasks, ``--help`` and other non-evaluating calls keep lmms-eval's
own exit status.
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .failures import describe_log

_TAIL = 256 * 1024  # bytes of each stream kept for the diagnosis


def option(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one given), else ``None``."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def is_evaluation(argv: Sequence[str]) -> bool:
    """Whether these lmms-eval arguments evaluate something (and so must leave results)."""
    if any(a in ("-h", "--help") for a in argv):
        return False
    tasks = option(argv, "--tasks") or ""
    if tasks.startswith("list"):
        return False
    return option(argv, "--model") is not None or option(argv, "--config") is not None


def results_files(output_path: str | None) -> set[tuple[str, int]]:
    """``*_results.json`` files under lmms-eval's ``--output_path``, with their modification times."""
    if not output_path:
        return set()
    root = Path(output_path)
    root = root.parent if root.suffix == ".json" else root
    if not root.is_dir():
        return set()
    return {(str(p), p.stat().st_mtime_ns) for p in root.rglob("*_results.json")}


def _pump(source: int, sink: TextIO, kept: bytearray) -> None:
    """Copy a child's stream to ours as it comes (progress bars included), keeping its tail."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(source, 65536):
        sink.write(decoder.decode(chunk))
        sink.flush()
        kept.extend(chunk)
        del kept[:-_TAIL]


def run_streamed(command: Sequence[str]) -> tuple[int, str]:
    """Run ``command`` with its stdout and stderr passed through; its exit status and the logs' tails."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    kept = (bytearray(), bytearray())
    pumps = [
        threading.Thread(target=_pump, args=(pipe.fileno(), sink, buf), daemon=True)
        for pipe, sink, buf in ((process.stdout, sys.stdout, kept[0]), (process.stderr, sys.stderr, kept[1]))
    ]
    for pump in pumps:
        pump.start()
    code = process.wait()
    for pump in pumps:
        pump.join()
    return code, "\n".join(buf.decode("utf-8", errors="replace") for buf in kept)


def failure(argv: Sequence[str], code: int, log: str, before: set[tuple[str, int]]) -> str | None:
    """Why the run failed, or ``None`` when it left what an evaluation leaves."""
    output_path = option(argv, "--output_path")
    failed = code != 0 or "Error during evaluation" in log
    if output_path and not results_files(output_path) - before:
        failed = True
    if not failed:
        return None
    where = f" to {output_path}" if output_path else ""
    return describe_log(log) or f"lmms-eval wrote no results{where} (exit status {code}); see its log above"


def main(argv: Sequence[str] | None = None) -> int:
    """Run lmms-eval with ``argv``; 1 and one ``error:`` line when an evaluation left no results."""
    args = list(sys.argv[1:] if argv is None else argv)
    before = results_files(option(args, "--output_path"))
    code, log = run_streamed([sys.executable, "-m", "lmms_eval", *args])
    if not is_evaluation(args):
        return code
    reason = failure(args, code, log, before)
    if reason is None:
        return 0
    sys.stdout.flush()
    print(f"error: {reason}", file=sys.stderr, flush=True)
    return 1
