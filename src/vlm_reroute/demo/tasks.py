"""Write the demo's held-out scenes and their two lmms-eval tasks to a local folder (no download).

The benchmark of ``vlm-reroute demo`` and these tasks read the same scenes (``seed`` 2025 by default,
:data:`vlm_reroute.demo.benchmark.DEMO_SEED`), prompts and grading
(:mod:`vlm_reroute.eval.tasks.demo_scenes`), so lmms-eval reports what the demo prints::

    python -m vlm_reroute.demo.tasks /tmp/demo-tasks            # 200 grounding + 100 VQA scenes
    python -m lmms_eval --model vlm_reroute --model_args pretrained=FOLDER,method=pdrop,ratio=0.222 \\
        --tasks vlm_reroute_demo_ground,vlm_reroute_demo_vqa --include_path /tmp/demo-tasks ...

``vlm-reroute eval --tasks vlm_reroute_demo_ground`` calls :func:`write_tasks` itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.tasks.demo_scenes import GROUND_TASK, VQA_TASK, task_yaml
from .benchmark import DEMO_SEED
from .scenes import scenes


def save_scenes(path: Path, n: int, kind: str, seed: int) -> Path:
    """``n`` scenes of ``kind`` as a ``save_to_disk`` dataset with one split, ``test``."""
    import datasets

    columns = {
        "image": datasets.Image(),
        "prompt": datasets.Value("string"),
        "family": datasets.Value("string"),
    }
    if kind == "ground":
        columns["box"] = datasets.Sequence(datasets.Value("float64"))
    else:
        columns["answer"] = datasets.Value("string")
    rows = [{k: s[k] for k in columns} for s in scenes(n, seed=seed, kind=kind)]
    for row in rows:
        if "box" in row:
            row["box"] = [float(v) for v in row["box"]]
    data = datasets.Dataset.from_list(rows, features=datasets.Features(columns))
    datasets.DatasetDict({"test": data}).save_to_disk(str(path))
    return path


def write_tasks(out: str | Path, n_ground: int = 200, n_vqa: int = 100, seed: int = DEMO_SEED) -> Path:
    """Draw the scenes into ``out/data-*`` and write both task YAMLs into ``out`` (an lmms-eval
    ``--include_path``). Counts must be positive (a task without documents would be an empty table)."""
    for name, value in (("n_ground", n_ground), ("n_vqa", n_vqa)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: give a positive number of scenes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for task, kind, n in ((GROUND_TASK, "ground", n_ground), (VQA_TASK, "vqa", n_vqa)):
        data = save_scenes(out / f"data-{kind}-seed{seed}-n{n}", n, kind, seed)
        (out / f"{task}.yaml").write_text(task_yaml(task, str(data.resolve())))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_reroute.demo.tasks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "out", help="folder for the data and the two task YAMLs (an lmms-eval --include_path)"
    )
    parser.add_argument("--n-ground", type=int, default=200)
    parser.add_argument("--n-vqa", type=int, default=100)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    args = parser.parse_args(argv)
    try:
        print(write_tasks(args.out, args.n_ground, args.n_vqa, args.seed))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
