"""Dataset mode of ``vlm-reroute run``: a JSONL file of prompts in, one JSON line per answer out.

Input, one JSON object per line (blank lines are skipped)::

    {"image": "street.png", "prompt": "Where is the man in the red shirt?", "box": [0.1, 0.2, 0.3, 0.9]}
    {"id": "pair-7", "image": ["left.png", "right.png"], "prompt": "What changed?"}

``image`` is a path (relative paths are read from the JSONL file's folder), an http(s) URL, or a
list of them (several images in one prompt); ``prompt`` is required; ``box`` (4 numbers) and
``id`` (default: the line number) are optional; other keys are copied to the output unchanged.
Every line and every image path is checked before the model loads.

Output, one JSON object per input line, in order: the input's keys, then ``answer``, ``method``,
``visual_tokens`` (per image), ``avg_visual_tokens`` (mean visual tokens per decoder layer),
``decisions`` (``layer``, ``kept``, ``reentered`` per decision) and, with ``--compare``,
``vanilla_answer``. Lines go to ``--output`` or to stdout, flushed after every batch: a failure
keeps the answers before it, and its one error line names the input lines it hit.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .app import fail


@dataclass(frozen=True)
class Prompt:
    """One line of a ``--input`` JSONL file, parsed and checked before any model loads.

    Attributes
    ----------
    line : int
        Its line number in the file (named in errors).
    images : tuple of str
        Its images: URLs as given, files resolved against the file's folder.
    prompt : str
        The question.
    record : dict
        Everything the line said, with ``id`` (default: the line number); copied into its output row.
    """

    line: int
    images: tuple[str, ...]
    prompt: str
    record: dict[str, Any]


def read_prompts(path: Path) -> list[Prompt]:
    """Every line parsed and checked (JSON, fields, image files exist), or one error line."""
    path = path.expanduser()
    if not path.is_file():
        fail(f"--input {str(path)!r}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--input {str(path)!r}: cannot read it ({exc})")
    prompts = []
    for number, text in enumerate(lines, start=1):
        if text.strip():
            prompts.append(_parse(path, number, text))
    if not prompts:
        fail(f"--input {str(path)!r} has no prompts (one JSON object per line)")
    return prompts


def _parse(path: Path, number: int, text: str) -> Prompt:
    where = f"{path}:{number}"
    try:
        record = json.loads(text)
    except ValueError as exc:
        fail(f"{where}: not a JSON object ({exc})")
    need = "each line needs 'image' (a path or a list of paths) and 'prompt' (text)"
    if not isinstance(record, dict):
        fail(f"{where}: not a JSON object; {need}")
    images, prompt = record.get("image"), record.get("prompt")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        fail(f"{where}: 'image' is {images!r}; {need}")
    if not isinstance(prompt, str) or not prompt.strip():
        fail(f"{where}: 'prompt' is {prompt!r}; {need}")
    box = record.get("box")
    if box is not None and (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in box)
    ):
        fail(f"{where}: 'box' is {box!r}; give 4 numbers [x1, y1, x2, y2] or leave it out")
    resolved = []
    for image in images:
        if image.startswith(("http://", "https://")):
            resolved.append(image)
            continue
        file = Path(image).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            fail(f"{where}: image file not found: {image} (relative paths start at {str(path.parent)!r})")
        resolved.append(str(file))
    return Prompt(number, tuple(resolved), prompt, {"id": record.get("id", number), **record})


def run_dataset(
    pipe: Any, prompts: list[Prompt], batch_size: int, compare: bool, output: Path | None, model: str
) -> None:
    """Answer ``prompts`` in batches; one JSON line each to ``output`` (or stdout), flushed as each
    batch finishes, so a failure keeps every answer before it and names the input lines it hit."""
    method = pipe.method.name if pipe.method is not None else "vanilla"
    sink: TextIO = open(output, "w", encoding="utf-8") if output is not None else sys.stdout  # noqa: SIM115
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    done, failure = 0, None
    try:
        with Progress(*columns, console=Console(stderr=True), transient=output is None) as bar:
            task = bar.add_task(method, total=len(prompts))
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                try:
                    rows = _answer(pipe, chunk, compare, method)
                except Exception as exc:  # noqa: BLE001 - any failure: one line naming the lines, answers kept
                    where = f"line {exc.line}" if isinstance(exc, _LineError) else _lines(chunk)
                    failure = f"{where}: {_reason(exc)}; {_kept(done, output)}"
                    bar.live.transient = True  # the error line alone, not a half-full bar above it
                    break
                sink.writelines(json.dumps(row) + "\n" for row in rows)
                sink.flush()
                done += len(chunk)
                bar.advance(task, len(chunk))
    finally:
        if sink is not sys.stdout:
            sink.close()
    if failure is not None:
        fail(failure)
    if output is not None:
        Console(stderr=True, highlight=False).print(f"{len(prompts)} answers ({method}) written to {output}")


class _LineError(Exception):
    """An input line whose image cannot be read (the failure names that line, not the batch)."""

    def __init__(self, line: int, cause: Exception) -> None:
        super().__init__(str(cause))
        self.line = line


def _answer(pipe: Any, chunk: list[Prompt], compare: bool, method: str) -> list[dict[str, Any]]:
    """The output rows of one batch: the input's keys, the answer, the routing and the cost."""
    from ..images import load_image
    from ..loading import LoadError

    samples = []
    for p in chunk:
        try:
            samples.append(([load_image(i) for i in p.images], p.prompt))
        except LoadError as exc:
            raise _LineError(p.line, exc) from exc
    inputs = pipe.builder.batch(samples, pipe.model)
    answers = pipe.generate(inputs)
    vanilla = pipe.generate(inputs, method=None) if compare else None
    rows = []
    for i, (p, answer) in enumerate(zip(chunk, answers, strict=True)):
        row = {
            **p.record,
            "answer": answer.text,
            "method": method,
            "visual_tokens": answer.visual_tokens,
            "avg_visual_tokens": answer.avg_visual_tokens,
            "decisions": answer.decisions,
        }
        if vanilla is not None:
            row["vanilla_answer"] = vanilla[i].text
        rows.append(row)
    return rows


def _lines(chunk: list[Prompt]) -> str:
    numbers = [p.line for p in chunk]
    return f"line {numbers[0]}" if len(numbers) == 1 else f"lines {', '.join(map(str, numbers))}"


def _reason(exc: Exception) -> str:
    """The message; the exception's type too when it is not one of the errors we raise on purpose."""
    from ..loading import LoadError

    ours = LoadError | ValueError | TypeError | _LineError
    return str(exc) if isinstance(exc, ours) else f"{type(exc).__name__}: {exc}"


def _kept(done: int, output: Path | None) -> str:
    """What the failure leaves: the answers written before it, and where."""
    if done == 0:
        return "no answers were written"
    where = f"are in {output}" if output is not None else "were printed"
    return f"the {done} answer{'s' * (done != 1)} before it {where}"
