"""Training batches for the demo model: a curriculum over scenes, token ids, labels and patch targets.

A training sequence is exactly what the processor builds for the prompt (chat template, 196
``<image>`` tokens), followed by the answer's tokens and ``</s>``; only the answer is scored.
Each visual token also gets per-patch targets (colour, shape and the normalised box of the object
under it, or background), the auxiliary objective that makes every patch of an object carry what
the object is and where it ends. Batches are a pure function of ``(seed, step)``: resuming gives
the same data as an uninterrupted run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .draw import COLORS, SHAPES, SIZE
from .scenes import FAMILIES, Scene, ask, make_scene
from .vocab import PAD_ID, answer_ids, box_text

COLOR_CLASSES = ("background", *COLORS)
SHAPE_CLASSES = ("background", *SHAPES)


@dataclass(frozen=True)
class Curriculum:
    """Objects per scene grow with the step; the share of grounding scenes stays fixed.

    Few, large objects first (the model learns colour, shape and boxes), then the benchmark's
    3–6 objects with same-colour / same-shape distractors.
    """

    ramp_steps: int = 1500
    ground_share: float = 0.65

    def objects(self, step: int, rng: random.Random) -> tuple[int, int]:
        frac = min(1.0, step / max(1, self.ramp_steps))
        high = 3 + round(3 * frac)
        low = 1 if frac < 0.34 else (2 if frac < 1.0 or rng.random() < 0.25 else 3)
        return low, high


def training_scenes(
    step: int, batch_size: int, seed: int, curriculum: Curriculum, turns: int = 1
) -> list[Scene]:
    """The scenes of training step ``step`` (keyed by seed and step, so resumable exactly).

    With ``turns`` > 1 each image also gets up to ``turns - 1`` further questions (any kind and
    family, no repeats) in ``scene.extra["turns"]`` as ``(prompt, answer text, target, about)``: a multi-turn
    conversation about one image, as LLaVA's instruction data has. The visual tokens are most of
    a sequence's cost, so each extra question adds supervision for a few percent more compute.
    """
    out = []
    for j in range(batch_size):
        rng = random.Random(f"train/{seed}/{step}/{j}")
        kind = "ground" if rng.random() < curriculum.ground_share else "vqa"
        family = rng.choice(FAMILIES[kind])
        scene = make_scene(rng, kind, family, curriculum.objects(step, rng))
        asked, targets = {scene.prompt}, {scene.target}
        extra: list[tuple[str, str, int | None, tuple[int, ...]]] = []
        for _ in range(3 * (turns - 1)):
            if len(extra) == turns - 1:
                break
            kind = "ground" if rng.random() < curriculum.ground_share else "vqa"
            made = ask(scene.objects, rng, kind, rng.choice(FAMILIES[kind]))
            # no repeated question, no second box of the same object (its answer would be a copy)
            if made is not None and made[0] not in asked and (made[1] is None or made[1] not in targets):
                asked.add(made[0])
                targets.add(made[1])
                extra.append((made[0], _answer_text(scene, made[1], made[2]), made[1], made[3]))
        scene.extra["turns"] = extra
        out.append(scene)
    return out


def _answer_text(scene: Scene, target: int | None, answer: str | None) -> str:
    if target is not None:
        return box_text(scene.objects[target].box, SIZE, SIZE)
    return str(answer)


def answer_of(scene: Scene) -> str:
    """The text the model must produce for ``scene``."""
    return _answer_text(scene, scene.target, scene.answer)


def prompt_ids(processor: Any, prompt: str, num_image_tokens: int) -> list[int]:
    """Ids of the chat-formatted prompt with its image tokens expanded, as ``processor(...)`` gives them."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace(processor.image_token, processor.image_token * num_image_tokens)
    return processor.tokenizer(text)["input_ids"]


def patch_targets(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch: colour class, shape class (0 = background) and the object's box (NaN on background)."""
    labels = scene.labels
    colors = np.zeros(labels.shape, dtype=np.int64)
    shapes = np.zeros(labels.shape, dtype=np.int64)
    boxes = np.full((*labels.shape, 4), np.nan, dtype=np.float32)
    for k, obj in enumerate(scene.objects):
        where = labels == k
        colors[where] = COLOR_CLASSES.index(obj.color)
        shapes[where] = SHAPE_CLASSES.index(obj.shape)
        boxes[where] = np.array(obj.box, dtype=np.float32) / SIZE
    return colors, shapes, boxes


def collate(
    scenes: list[Scene], processor: Any, num_image_tokens: int, point_vqa: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, labels (answers only), pixels, per-patch targets, and the
    pointing targets (:mod:`.pointing`): ``point_rows`` (batch row, query position) and
    ``point_where`` (the visual tokens of the objects the answer is about), and for grounding
    answers ``box_rows`` and ``point_box`` (the target's normalised box, for the readouts).

    A grounding answer points from its ``[`` (the position that predicts ``x1``). With
    ``point_vqa`` a VQA answer about objects (the object whose colour or shape is asked, the
    objects counted, the object a "yes" names) points from the last prompt position, the one that
    predicts the answer word; a count of 0 and a "no" have nothing to point at.
    """
    rows, labels, points = [], [], []
    for b, scene in enumerate(scenes):
        prompt = prompt_ids(processor, scene.prompt, num_image_tokens)
        first = prompt.index(processor.image_token_id)
        answer = answer_ids(answer_of(scene))
        row, lab_row = prompt + answer, [-100] * len(prompt) + answer
        points.append(_Point(b, len(prompt), first, scene.target, scene.about))
        for question, text, target, about in scene.extra.get("turns", ()):  # "</s>USER: q ASSISTANT:"
            turn = processor.tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
            reply = answer_ids(text)
            points.append(_Point(b, len(row) + len(turn), first, target, about))
            row, lab_row = row + turn + reply, lab_row + [-100] * len(turn) + reply
        rows.append(row)
        labels.append(lab_row)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (row, lab_row) in enumerate(zip(rows, labels, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        lab[b, : len(row)] = torch.tensor(lab_row)
        mask[b, : len(row)] = 1
    pixels = processor.image_processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    targets = [patch_targets(s) for s in scenes]
    box_rows, grounded_where, boxed = _pointing(scenes, [p for p in points if p.target is not None], length)
    point_rows, point_where = box_rows, grounded_where  # without VQA pointing: the same rows
    if point_vqa:
        point_rows, point_where, _ = _pointing(scenes, points, length)
    point_box = torch.tensor(
        [[v / SIZE for v in scenes[p.row].objects[p.target].box] for p in boxed],  # type: ignore[index]
        dtype=torch.float32,
    ).reshape(-1, 4)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": lab,
        "pixel_values": pixels,
        "patch_color": torch.from_numpy(np.stack([t[0] for t in targets])),
        "patch_shape": torch.from_numpy(np.stack([t[1] for t in targets])),
        "patch_box": torch.from_numpy(np.stack([t[2] for t in targets])),
        "point_rows": point_rows,
        "point_where": point_where,
        "box_rows": box_rows,
        "point_box": point_box,
    }


@dataclass(frozen=True)
class _Point:
    """One answer of a batch: its row, the position of its first answer token, the row's first
    visual token, its grounding target (None for VQA) and the objects it is about."""

    row: int
    answer_at: int
    first_visual: int
    target: int | None
    about: tuple[int, ...]

    @property
    def query(self) -> int:
        """The position that predicts the first informative answer token: ``[`` (which predicts
        ``x1``) for a box, the last prompt token (which predicts the word) for a VQA answer."""
        return self.answer_at if self.target is not None else self.answer_at - 1


def _pointing(
    scenes: list[Scene], points: list[_Point], length: int
) -> tuple[torch.Tensor, torch.Tensor, list[_Point]]:
    """(row, query position) and the masks of the pointed objects' visual tokens of the answers
    whose objects have patches, and those answers."""
    rows, where, kept = [], [], []
    for p in points:
        labels = torch.from_numpy(scenes[p.row].labels.reshape(-1))
        patches = torch.isin(labels, torch.tensor(p.about, dtype=labels.dtype))
        if not patches.any():
            continue
        mask = torch.zeros(length, dtype=torch.bool)
        mask[p.first_visual : p.first_visual + patches.numel()] = patches
        rows.append((p.row, p.query))
        where.append(mask)
        kept.append(p)
    if not rows:
        return torch.zeros((0, 2), dtype=torch.long), torch.zeros((0, length), dtype=torch.bool), []
    return torch.tensor(rows), torch.stack(where), kept
