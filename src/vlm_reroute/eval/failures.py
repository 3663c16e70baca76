"""One line saying why an lmms-eval run failed, for ``vlm-reroute eval`` and ``python -m vlm_reroute.eval``.

lmms-eval 0.7 catches every exception of an evaluation, logs it and exits with status 0 without writing
results, so a failure is recognised by what is missing (the results) and explained from the exception or
lmms-eval's log. Torch-free, like the rest of the package's lmms-eval glue outside the model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

#: how to see every task name lmms-eval knows (its own, plus folders given with ``--include_path``)
LIST_TASKS = "python -m lmms_eval --tasks list"
SHIPPED_TASKS = "{refcoco,refcoco+,refcocog}_bbox_rec_{llava,qwen2_vl,qwen2_5_vl}_{split}"

# known causes -> what to do (substring of the error, hint)
_HINTS = (
    (
        "filelock._api",
        "lmms-eval 0.7.3 needs filelock<4; pip install 'filelock>=3.16,<4' (the eval extra pins it)",
    ),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NOT_FOUND = re.compile(r"Tasks not found: (.+?)\. Try")
_DURING = re.compile(r"Error during evaluation: (.*?)\.? Please set `--verbosity=DEBUG`", re.S)
_RAISED = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Interrupt)): (.*)$")


class EvalFailed(RuntimeError):
    """lmms-eval produced no results for a grid cell: the message is the one line to show.

    It exists so that ``vlm-reroute eval`` reports an lmms-eval failure (an exception, or no results
    returned) as one ``error:`` line naming the cell, instead of a traceback from inside lmms-eval.
    """


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def with_hint(message: str) -> str:
    """``message``, plus what to do when it is a known cause."""
    for needle, hint in _HINTS:
        if needle in message:
            return f"{message} ({hint})"
    return message


def unknown_tasks(missing: Iterable[str], known: Iterable[str] = (), plain_lmms_eval: bool = False) -> str:
    """The one line for task names lmms-eval does not know: close matches and how to list the names.

    ``plain_lmms_eval``: the run was ``python -m lmms_eval`` (flags ``--include_path``), where the
    shipped tasks are found only through ``--include_path``; ``vlm-reroute eval`` adds them itself.
    """
    missing, known = list(missing), list(known)
    close = [m for name in missing for m in difflib.get_close_matches(name, known, n=1)]
    guess = f" (did you mean {', '.join(close)}?)" if close else ""
    if plain_lmms_eval:
        from .tasks import TASK_DIR

        where = f"vlm-reroute's {SHIPPED_TASKS} need --include_path {TASK_DIR}"
    else:
        where = f"vlm-reroute ships {SHIPPED_TASKS}; add a task folder with --include-path"
    return (
        f"unknown lmms-eval task {', '.join(missing)}{guess}; list the task names with `{LIST_TASKS}` "
        f"(and --include_path for a task folder); {where}"
    )


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message``, plus a hint for a known cause."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return with_hint(text)


def describe_log(log: str) -> str | None:
    """Why lmms-eval failed, read from its log (stdout + stderr), or ``None`` when the log does not say."""
    log = _ANSI.sub("", log)
    found = _NOT_FOUND.search(log)
    if found:
        names = [n.strip() for n in found.group(1).split(",") if n.strip()]
        return unknown_tasks(names, plain_lmms_eval=True)
    found = _DURING.search(log)
    if found:
        return with_hint(one_line(found.group(1)))
    raised = [m for m in (_RAISED.match(line.strip()) for line in log.splitlines()) if m]
    if raised:
        return with_hint(one_line(f"{raised[-1].group(1)}: {raised[-1].group(2)}"))
    return None
