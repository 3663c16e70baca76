"""Shared pieces of the lmms-eval tests: tiny checkpoints, datasets and tasks, a direct reference."""

from __future__ import annotations

from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch

from vlm_reroute.families import family_names
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint
from vlm_reroute.testing.datasets import save_rec_dataset, save_vqa_dataset, write_vqa_task

MAX_NEW_TOKENS = 12


class Workspace(dict):
    """Paths of an evaluation workspace; a family's tiny checkpoint is saved the first time it is asked for
    (``ws["internvl"]``), so a session saves only the families its tests use, once."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, key: str) -> Path:
        if key not in family_names():
            raise KeyError(key)
        self[key] = save_tiny_checkpoint(key, self.root / f"ckpt_{key}")
        return self[key]


@cache
def workspace(root: Path) -> Workspace:
    """A REC and a VQA dataset and a task folder under ``root``, and tiny checkpoints on demand."""
    from vlm_reroute.eval.tasks import write_task_dir

    out = Workspace(root)
    out["rec"] = save_rec_dataset(root / "rec", n=4)
    out["vqa"] = save_vqa_dataset(root / "vqa", n=4)
    out["tasks"] = write_task_dir(root / "tasks", {"refcoco": str(out["rec"])})
    write_vqa_task(out["tasks"], out["vqa"])
    return out


def shared_workspace(tmp_path_factory) -> Workspace:
    """The session's workspace (one per test process): every eval test module shares its files."""
    return workspace(tmp_path_factory.getbasetemp() / "eval-workspace")


def rec_docs(path: Path, family: str) -> list[dict]:
    """The REC documents as the task sees them (after its ``process_docs``)."""
    import datasets

    from vlm_reroute.eval.tasks import refcoco
    from vlm_reroute.families import get_family

    resized = refcoco.FORMATS[get_family(family).grounding].resized
    preprocess = refcoco.preprocess_qwen if resized else refcoco.preprocess
    return list(preprocess(datasets.load_from_disk(str(path))["val"]))


def direct_answers(checkpoint: Path, pairs: list[tuple], make_method) -> list[tuple[str, dict]]:
    """Answers of a plain routed ``generate()`` one sample at a time, with the CLI's prompt builder.

    ``pairs``: ``(image, prompt)``; ``make_method(model, inputs)`` returns a method or ``None``.
    Returns ``(answer, inputs)`` per pair.
    """
    import transformers

    from vlm_reroute.loading import PromptBuilder

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    model = getattr(transformers, config.architectures[0]).from_pretrained(checkpoint).eval()
    builder = PromptBuilder.from_pretrained(str(checkpoint), model)
    tokenizer = builder.tokenizer
    out = []
    for image, prompt in pairs:
        inputs = builder(image, prompt, model)
        method = make_method(model, inputs)
        gen = dict(
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.no_grad(), method(model) if method is not None else nullcontext():
            ids = model.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1] :]
        out.append((builder.decode(ids), inputs))
    return out
