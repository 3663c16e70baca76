"""Drawing the differential fuzz's seeded random cases (run by ``fuzz_cases.run_case``).

A case is a tiny model (family, depth 4-10, hidden 32-64, GQA or not, sdpa or eager), a batch of
1-4 left-padded prompts with 1-3 images each (Qwen images of different grids in one batch), a
schedule (1-4 decisions, int / float keeps, prune / reroute, both scoring conventions) and a
mode (forward logits, greedy ``generate``, sampled ``generate``). Split from ``fuzz_cases.py``:
this file draws a case, that one runs it and compares it with the reference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from fuzz_reference import Schedule

from vlm_reroute.testing.families import (
    NEW_FAMILIES,
    SPECIALS,
    tiny_family_config,
    tiny_family_inputs,
    tiny_family_processor,
)
from vlm_reroute.testing.models import FAMILIES as ORIGINAL_FAMILIES
from vlm_reroute.testing.models import IMAGE_TOKEN, TextShape

MODES = ("forward", "greedy", "sample")
LLAVA_IMAGE_SIZE = 112  # patch 14 → 8 x 8 = 64 tokens per image
QWEN_GRIDS = (4, 6, 8, 10, 12)  # patch grid sides; merged 2 x 2 → (h/2)(w/2) tokens
FAMILIES = (*ORIGINAL_FAMILIES, *NEW_FAMILIES)
# image sizes (height, width) in pixels drawn for the processor-built families
IMAGE_SIZES = {
    "qwen3_vl": ((64, 64), (96, 128), (128, 64), (160, 96), (128, 160)),
    "llava_next": ((60, 60), (80, 150), (150, 70), (100, 100), (56, 112)),
    "llava_onevision": ((60, 60), (150, 70), (100, 130), (120, 200)),
    "internvl": ((112, 112), (100, 230), (200, 120), (90, 150)),
    "idefics3": ((60, 80), (150, 250), (200, 120), (112, 112)),
}
IMAGE_SIZES["qwen3_vl_moe"] = IMAGE_SIZES["qwen3_5"] = IMAGE_SIZES["qwen3_vl"]
IMAGE_SIZES["smolvlm"] = IMAGE_SIZES["idefics3"]
QUESTION_CHARS = "abcdefghijklmnopqrstuvwxyz ?"


@dataclass(frozen=True)
class PromptSpec:
    """``texts``: text lengths before, between and after the images (len = images + 1);
    ``grids``: (h, w) patch grid per image (LLaVA: fixed by the image size). For the
    processor-built families ``texts`` is ``(question length,)`` and ``grids`` the image sizes in
    pixels."""

    texts: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Case:
    index: int
    seed: int
    family: str
    shape: tuple[int, int, int, int, int]  # layers, hidden, heads, kv_heads, ffn
    attn: str
    weight_seed: int
    prompts: tuple[PromptSpec, ...]
    schedule: Schedule
    fastv: bool  # built with FastV(layer, keep) instead of PDrop
    mode: str
    new_tokens: int
    ties: bool = False  # queries zeroed: every score of a row is equal, decisions are pure tie-breaks

    def repro(self) -> str:
        return (
            f"cd tests && python -c 'from fuzz_cases import make_case, run_case; "
            f"print(run_case(make_case({self.index}, seed={self.seed})))'"
        )


# ---------------------------------------------------------------------------------------------
# Drawing cases
# ---------------------------------------------------------------------------------------------
def tokens_of(family: str, grid: tuple[int, int]) -> int:
    return (LLAVA_IMAGE_SIZE // 14) ** 2 if family == "llava" else (grid[0] // 2) * (grid[1] // 2)


def decision_layers(layer_types: list[str] | None, depth: int, score_from: str) -> list[int]:
    """Layers a decision can be made at: any but the first; on a hybrid decoder the scoring layer
    (the decision layer, or the one before it under ``previous``) must be a full-attention layer
    (a linear-attention layer has no attention row)."""
    if not layer_types:
        return list(range(1, depth))
    shift = 1 if score_from == "previous" else 0
    return [j for j in range(1, depth) if layer_types[j - shift] == "full_attention"]


def _draw_schedule(
    rng: random.Random, depth: int, sizes: list[int], reroute: bool, layer_types: list[str] | None = None
) -> Schedule:
    score_from = "previous" if rng.random() < 0.3 else "current"
    allowed = decision_layers(layer_types, depth, score_from)
    n_decisions = rng.randint(1, min(4, len(allowed)))
    layers = tuple(sorted(rng.sample(allowed, n_decisions)))
    smallest = min(sizes)
    for _ in range(200):
        keep: list[int | float] = []
        kind = rng.choice(["int", "float", "mixed"])
        for _ in layers:
            as_int = kind == "int" or (kind == "mixed" and rng.random() < 0.5)
            keep.append(rng.randint(1, smallest) if as_int else round(rng.uniform(0.05, 1.0), 3))
        if not reroute and len({type(k) for k in keep}) == 1:
            keep.sort(reverse=True)  # same-kind prune keeps must not increase (mixed: checked below)
        if reroute or _non_increasing(keep, sizes):
            return Schedule(layers, tuple(keep), reroute, score_from)
    raise RuntimeError("could not draw a prune schedule")  # pragma: no cover


def _non_increasing(keep: list[int | float], sizes: list[int]) -> bool:
    from fuzz_reference import keep_count

    return all(
        keep_count(b, n) <= keep_count(a, n) for n in sizes for a, b in zip(keep, keep[1:], strict=False)
    )


def make_case(index: int, seed: int = 0) -> Case:
    """Case ``index`` of the stream ``seed``; families and modes rotate with ``index``."""
    rng = random.Random(seed * 1_000_003 + index)
    family = FAMILIES[index % len(FAMILIES)]
    depth = rng.randint(4, 10)
    hidden = rng.choice([32, 48, 64])
    heads = rng.choice([2, 4])
    kv_heads = heads if rng.random() < 0.4 else rng.choice([1, heads // 2])
    shape = (depth, hidden, heads, kv_heads, rng.choice([64, 96, 128]))
    prompts = []
    layer_types = None
    if family in NEW_FAMILIES:
        batch = rng.choices([1, 2, 3], weights=[45, 35, 20])[0]
        for _ in range(batch):
            images = tuple(rng.choice(IMAGE_SIZES[family]) for _ in range(rng.randint(1, 2)))
            prompts.append(PromptSpec((rng.randint(3, 25),), images))
        sizes = [n for row in family_token_counts(family, tuple(prompts), seed, index) for n in row]
        text = TextShape(layers=depth, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=shape[4])
        config = tiny_family_config(family, text)
        layer_types = getattr(config.get_text_config(), "layer_types", None)
    else:
        batch = rng.choices([1, 2, 3, 4], weights=[35, 30, 20, 15])[0]
        for _ in range(batch):
            images = rng.randint(1, 3)
            texts = (rng.randint(1, 6), *(rng.randint(0, 4) for _ in range(images - 1)), rng.randint(1, 12))
            if family == "llava":
                grids = ((8, 8),) * images
            else:
                grids = tuple((rng.choice(QWEN_GRIDS), rng.choice(QWEN_GRIDS)) for _ in range(images))
            prompts.append(PromptSpec(texts, grids))
        sizes = [tokens_of(family, g) for p in prompts for g in p.grids]
    reroute = rng.random() < 0.5
    schedule = _draw_schedule(rng, depth, sizes, reroute, layer_types)
    fastv = len(schedule.layers) == 1 and not reroute and rng.random() < 0.5
    mode = rng.choices(MODES, weights=[50, 35, 15])[0]
    return Case(
        index=index,
        seed=seed,
        family=family,
        shape=shape,
        attn=rng.choice(["sdpa", "eager"]),
        weight_seed=rng.randint(0, 3),
        prompts=tuple(prompts),
        schedule=schedule,
        fastv=fastv,
        mode=mode,
        new_tokens=rng.randint(2, 5),
        ties=rng.random() < 0.08,
    )


# ---------------------------------------------------------------------------------------------
# Inputs of a case: token counts per image, read from the ids by the family's prompt structure
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _bundle(family: str):
    return tiny_family_processor(family)


def _questions(case_seed: int, index: int, prompts: tuple[PromptSpec, ...]) -> tuple[str, ...]:
    rng = random.Random(case_seed * 7919 + index)
    return tuple("".join(rng.choice(QUESTION_CHARS) for _ in range(p.texts[0])) for p in prompts)


def family_inputs(family: str, prompts: tuple[PromptSpec, ...], seed: int, index: int) -> dict:
    sizes = tuple(p.grids for p in prompts)
    questions = _questions(seed, index, prompts)
    return tiny_family_inputs(family, sizes, questions, seed=seed * 31 + index, bundle=_bundle(family))


def image_token_counts(family: str, ids: torch.Tensor) -> list[int]:
    """Tokens of each image in one prompt's ``ids`` (padding removed), by the family's prompt
    structure (the processors' expansion rules, ``docs/families-notes.md``): every image is one run
    of the image token (its views and newlines included) — except Idefics3 / SmolVLM, where an image
    is a run per tile closed by the run that follows ``<global-img>``."""
    is_image = (ids == IMAGE_TOKEN).tolist()
    runs: list[tuple[int, int]] = []  # (start, length)
    for i, flag in enumerate(is_image):
        if flag and (i == 0 or not is_image[i - 1]):
            runs.append((i, 0))
        if flag:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
    if family not in ("idefics3", "smolvlm"):
        return [length for _, length in runs]
    closing = SPECIALS[family]["<global-img>"]
    counts, current = [], 0
    for start, length in runs:
        current += length
        if start > 0 and int(ids[start - 1]) == closing:
            counts.append(current)
            current = 0
    if current:
        raise ValueError(f"image tokens after the last <global-img> run: {current}")
    return counts


@lru_cache(maxsize=64)
def family_token_counts(family: str, prompts: tuple[PromptSpec, ...], seed: int, index: int):
    inputs = family_inputs(family, prompts, seed, index)
    counts = []
    for b, spec in enumerate(prompts):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        row = image_token_counts(family, ids)
        if len(row) != len(spec.grids):
            raise ValueError(f"{family}: prompt {b} has {len(spec.grids)} images but {len(row)} were found")
        counts.append(tuple(row))
    return tuple(counts)
