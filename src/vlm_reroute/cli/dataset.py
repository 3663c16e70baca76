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
``vanilla_answer``. Lines go to ``--output`` (written as they come) or to stdout.
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
    """One input line: where it came from, its images (resolved) and everything it said."""

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
    """Answer ``prompts`` in batches; one JSON line each to ``output`` (or stdout) as they finish."""
    from ..loading import LoadError, load_image

    method = pipe.method.name if pipe.method is not None else "vanilla"
    sink: TextIO = open(output, "w", encoding="utf-8") if output is not None else sys.stdout  # noqa: SIM115
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=output is None) as bar:
            task = bar.add_task(method, total=len(prompts))
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                samples = []
                for p in chunk:
                    try:
                        samples.append(([load_image(i) for i in p.images], p.prompt))
                    except LoadError as exc:
                        fail(f"line {p.line}: {exc}")
                inputs = pipe.builder.batch(samples, pipe.model)
                answers = pipe.generate(inputs)
                vanilla = pipe.generate(inputs, method=None) if compare else None
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
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                bar.advance(task, len(chunk))
    finally:
        if sink is not sys.stdout:
            sink.close()
    if output is not None:
        Console(stderr=True, highlight=False).print(f"{len(prompts)} answers ({method}) written to {output}")
