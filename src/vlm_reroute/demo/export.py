"""Copy a training checkpoint into a shippable folder, in float16, without optimizer state.

    python -m vlm_reroute.demo.export /work/demo-train                 # → the package's checkpoint/
    python -m vlm_reroute.demo.export /work/demo-train /tmp/demo-fp16  # → another folder

The source is a training folder (its ``model/`` subfolder is used) or any ``save_pretrained``
folder of the demo model. The target receives the fp16 weights, the processor files and
``training.json`` (step and training hours), and nothing else: the optimizer state stays with the
training run, so the package (and git history) only ever holds weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from . import checkpoint_path, curve
from .model import save


def export(source: str | Path, target: str | Path | None = None) -> Path:
    """Write ``source``'s model as fp16 into ``target`` (default: the package's checkpoint folder)."""
    from transformers import AutoModelForImageTextToText

    from ..loading import quiet_transformers

    source = Path(source)
    folder = source / "model" if (source / "model" / "config.json").exists() else source
    if not (folder / "config.json").exists():
        raise SystemExit(f"error: {source} holds no demo model (no config.json, no model/config.json)")
    target = Path(target) if target is not None else checkpoint_path()
    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    staging = target.with_name(target.name + ".export-tmp")
    if staging.exists():
        shutil.rmtree(staging)
    save(model, staging, dtype=torch.float16)
    rows = curve.read(source)
    step_file = folder / "step.txt"
    info = {
        "step": int(step_file.read_text()) if step_file.exists() else None,
        "training_hours": round(rows[-1]["hours"], 3) if rows else None,
        "last_eval": next((r for r in reversed(rows) if r.get("type") == "eval"), None),
    }
    (staging / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_reroute.demo.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", help="training folder (with model/) or a save_pretrained folder")
    parser.add_argument("target", nargs="?", default=None, help="output folder (default: the package's)")
    args = parser.parse_args(argv)
    out = export(args.source, args.target)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
