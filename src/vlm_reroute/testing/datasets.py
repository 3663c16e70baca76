"""Tiny evaluation datasets with real images drawn by PIL, saved in the layout of lmms-eval's datasets.

* :func:`save_rec_dataset`: referring-expression grounding in the schema of ``lmms-lab/RefCOCO``
  (``question_id``, ``image``, ``question``, ``answer`` = list of expressions, ``segmentation`` = polygon,
  ``bbox`` = ``[x, y, w, h]`` in pixels, ``iscrowd``, ``file_name``): coloured shapes on a plain
  background, each expression names one shape.
* :func:`save_vqa_dataset`: yes/no questions in the schema of ``lmms-lab/POPE`` (``question_id``,
  ``question``, ``answer`` ∈ {yes, no}, ``image``, ``category``, ``image_source``).

Both are ``datasets.DatasetDict.save_to_disk`` folders that a task loads with
``dataset_path: <folder>`` and ``dataset_kwargs: {load_from_disk: true}``. Image sizes vary so
that Qwen's dynamic resolution gives different token counts per image. Needs the ``datasets`` package
(installed with lmms-eval).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle")
SIZES = ((224, 168), (280, 224), (196, 252), (336, 336), (252, 196), (308, 224))


def _scene(seed: int, size: tuple[int, int]) -> tuple[Image.Image, list[tuple[str, str, list[float]]]]:
    """An image with two or three non-overlapping shapes; returns ``(image, [(colour, shape, xywh)])``."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, (rng.randint(200, 250),) * 3)
    draw = ImageDraw.Draw(image)
    colours = rng.sample(sorted(COLOURS), k=rng.choice((2, 3)))
    objects, columns = [], len(colours)
    for i, colour in enumerate(colours):
        cell = width / columns
        w = rng.randint(int(cell * 0.4), int(cell * 0.8))
        h = rng.randint(int(height * 0.25), int(height * 0.6))
        x = int(i * cell + rng.randint(0, int(cell - w)))
        y = rng.randint(0, height - h)
        shape = rng.choice(SHAPES)
        box = (x, y, x + w, y + h)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        objects.append((colour, shape, [float(x), float(y), float(w), float(h)]))
    return image, objects


def _polygon(box: list[float]) -> list[float]:
    """The box outline as a COCO polygon ``[x1, y1, x2, y1, x2, y2, x1, y2]`` (RefCOCO's segmentation)."""
    x, y, w, h = box
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def save_rec_dataset(path: str | Path, n: int = 4, splits: tuple[str, ...] = ("val",), seed: int = 0) -> Path:
    """Write a RefCOCO-shaped dataset of ``n`` images per split (two expressions per image) to ``path``."""
    import datasets

    path = Path(path)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Sequence(datasets.Value("string")),
            "segmentation": datasets.Sequence(datasets.Value("float32")),
            "bbox": datasets.Sequence(datasets.Value("float32")),
            "iscrowd": datasets.Value("int8"),
            "file_name": datasets.Value("string"),
        }
    )
    parts = {}
    for s, split in enumerate(splits):
        rows = []
        for i in range(n):
            image, objects = _scene(seed * 1000 + s * 100 + i, SIZES[i % len(SIZES)])
            colour, shape, box = objects[i % len(objects)]
            rows.append(
                {
                    "question_id": f"{split}-{i}",
                    "image": image,
                    "question": "Please carefully observe the area circled in the image and come up with a "
                    "caption for the area.",
                    "answer": [f"the {colour} {shape}", f"{colour} one"],
                    "segmentation": _polygon(box),
                    "bbox": box,
                    "iscrowd": 0,
                    "file_name": f"{split}_{i}.png",
                }
            )
        parts[split] = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


def save_vqa_dataset(path: str | Path, n: int = 4, split: str = "test", seed: int = 1) -> Path:
    """Write a POPE-shaped yes/no dataset of ``n`` questions to ``path`` (half of the answers are yes)."""
    import datasets

    path = Path(path)
    rows = []
    for i in range(n):
        image, objects = _scene(seed * 1000 + i, SIZES[(i + 2) % len(SIZES)])
        present = {colour for colour, _, _ in objects}
        if i % 2 == 0:
            colour, answer = sorted(present)[0], "yes"
        else:
            colour, answer = sorted(set(COLOURS) - present)[0], "no"
        rows.append(
            {
                "question_id": str(i),
                "question": f"Is there a {colour} object in the image?",
                "answer": answer,
                "image": image,
                "category": "adversarial",
                "image_source": f"drawn_{i}",
            }
        )
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
            "category": datasets.Value("string"),
            "image_source": datasets.Value("string"),
        }
    )
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows, features=features)}).save_to_disk(str(path))
    return path


def write_vqa_task(folder: str | Path, dataset_path: str | Path, name: str = "tiny_pope") -> Path:
    """A task YAML ``name`` in ``folder`` that runs lmms-eval's own POPE functions on a local dataset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    utils = "lmms_eval.tasks.pope.utils"
    metrics = "".join(
        f"  - metric: pope_{m}\n    aggregation: !function {utils}.pope_aggregate_{m}\n"
        "    higher_is_better: true\n"
        for m in ("accuracy", "precision", "recall", "f1_score", "yes_ratio")
    )
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        f"dataset_path: {Path(dataset_path).resolve()}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {utils}.pope_doc_to_visual\n"
        f"doc_to_text: !function {utils}.pope_doc_to_text\n"
        'doc_to_target: "answer"\n'
        "generation_kwargs:\n  max_new_tokens: 8\n  temperature: 0\n  do_sample: false\n"
        f"process_results: !function {utils}.pope_process_results\n"
        f"metric_list:\n{metrics}"
        'lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ""\n'
        '    post_prompt: "\\nAnswer the question using a single word or phrase."\n'
        "metadata:\n  - version: 0.0\n"
    )
    return folder / f"{name}.yaml"


def main(argv: list[str] | None = None) -> None:
    """``python -m vlm_reroute.testing.datasets OUT``: tiny REC and VQA datasets and a task folder in OUT."""
    import argparse

    from ..eval.tasks import write_task_dir

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rec", type=int, default=4, help="REC images (two expressions each)")
    parser.add_argument("--vqa", type=int, default=8, help="yes/no questions")
    args = parser.parse_args(argv)
    rec = save_rec_dataset(args.out / "rec", n=args.rec)
    tasks = write_task_dir(args.out / "tasks", {"refcoco": str(rec.resolve())})
    write_vqa_task(tasks, save_vqa_dataset(args.out / "vqa", n=args.vqa))
    print(f"tasks: {tasks} (refcoco_bbox_rec_<family>_val on {rec}, tiny_pope)")


if __name__ == "__main__":
    main()
