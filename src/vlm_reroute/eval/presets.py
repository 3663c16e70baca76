"""The paper's task sets as ``vlm-reroute eval --preset NAME``, each resolved for a model family.

* ``paper-main``: POPE and the eight RefCOCO / RefCOCO+ / RefCOCOg splits of the paper's grounding table
  (RefCOCO val/testA/testB, RefCOCO+ val/testA/testB, RefCOCOg val/test), in the family's own task variant
  (``refcoco_bbox_rec_{family}_{split}``: its prompt, parser and coordinates).
* ``ablation``: GQA, MMBench (``mmbench_en_dev``) and RefCOCO testA/testB.

A family without a grounding format (Idefics3, SmolVLM) gets the VQA tasks only; :func:`describe` says
so. Torch-free: ``--dry-run`` lists the tasks without loading anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..families import FAMILIES, get_family

GROUNDING_SPLITS = (
    ("refcoco", "val"),
    ("refcoco", "testA"),
    ("refcoco", "testB"),
    ("refcoco+", "val"),
    ("refcoco+", "testA"),
    ("refcoco+", "testB"),
    ("refcocog", "val"),
    ("refcocog", "test"),
)
#: preset → (VQA tasks, grounding splits)
PRESETS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "paper-main": (("pope",), GROUNDING_SPLITS),
    "ablation": (("gqa", "mmbench_en_dev"), (("refcoco", "testA"), ("refcoco", "testB"))),
}


def is_grounding_task(task: str) -> bool:
    """A shipped RefCOCO REC variant (the tasks the report's average ratio is taken over)."""
    return "_bbox_rec_" in task


def preset_tasks(preset: str, family: str) -> list[str]:
    """The tasks ``preset`` runs for ``family`` (VQA first, then the family's grounding variants)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: allowed are {', '.join(PRESETS)}")
    vqa, splits = PRESETS[preset]
    entry = get_family(family)
    grounding = [f"{d}_bbox_rec_{family}_{s}" for d, s in splits] if entry.grounding is not None else []
    return [*vqa, *grounding]


def describe(preset: str, families: Sequence[str] | None = None) -> str:
    """One line per family: the tasks ``preset`` gives it (for ``--dry-run``)."""
    names = list(families) if families is not None else [f.name for f in FAMILIES]
    lines = [f"preset {preset}:"]
    for name in names:
        tasks = preset_tasks(preset, name)
        note = "" if get_family(name).grounding is not None else " (VQA only: no documented grounding format)"
        lines.append(f"  {name} ({get_family(name).label}){note}: {', '.join(tasks)}")
    return "\n".join(lines)
