"""Shared fixtures: tiny random-weight models of every supported family, built once per session."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from vlm_reroute.testing.families import FAMILY_CLASSES, NEW_FAMILIES, tiny_family_inputs, tiny_family_model
from vlm_reroute.testing.models import FAMILIES, IMAGE_TOKEN, PAD_TOKEN, TextShape, tiny_inputs, tiny_model

sys.path.insert(0, str(Path(__file__).parent))
# The tiny models' large random weights (std 0.2) drive SiLU outputs below 1e-38: float32 denormals,
# which make CPU matmuls about 100x slower. Flushing them to zero (it changes no value above 1e-38)
# works on the calling thread only, so the tests run on one thread (tiny models do not scale anyway).
torch.set_num_threads(1)
torch.set_flush_denormal(True)


@cache
def model_for(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """Cached tiny model (8 layers, hidden 64, 576 visual tokens per image in fp32)."""
    if dtype == torch.float32:
        return tiny_model(family, attn_implementation=attn)
    # bf16/fp16: the tiniest shapes only (this CPU has no fast half precision)
    kwargs = {"shape": TextShape(layers=4, hidden=32, heads=2, ffn=64)}
    if family == "llava":
        kwargs["image_size"] = 112
    return tiny_model(family, attn_implementation=attn, dtype=dtype, **kwargs)


MATRIX_TOKENS = 64  # visual tokens per image in the method x family matrix (8 x 8 grids)


# The image each prompt of the newer families holds in the matrix: one size, about 64 tokens (LLaVA-NeXT
# and OneVision cannot reach 64 exactly: base 4x4 view + unpadded crop grid + one newline per row).
MATRIX_IMAGES = {
    "llava_next": (150, 80),  # 16 + 8x4 grid + 8 newlines = 56
    "llava_onevision": (112, 56),  # 56
    "internvl": (100, 300),  # 3 tiles + thumbnail, 16 tokens each = 64
    "idefics3": (100, 300),  # 1x3 tiles + global image, 16 tokens each = 64
    "smolvlm": (100, 300),
}


@cache
def small_model_for(family: str):
    """Cached tiny model whose images are 8 × 8 = 64 visual tokens (about 64 for the multi-view
    families): the matrix runs many cases."""
    if family in NEW_FAMILIES:
        return tiny_family_model(family)
    return tiny_model(family, image_size=112) if family == "llava" else tiny_model(family)


def family_name(model) -> str | None:
    """The ``vlm_reroute.testing.families`` name of a newer-family model, None for the original three."""
    name = type(model).__name__
    return next((f for f, cls in FAMILY_CLASSES.items() if cls == name), None)


def small_inputs(model, text_lengths=(20,), seed: int = 0, images_per_prompt: int = 1) -> dict:
    """Inputs for :func:`small_model_for` models: one 64-token image per prompt by default (the newer
    families' processors make one image of :data:`MATRIX_IMAGES` per prompt, ``text_lengths`` characters
    of question each)."""
    family = family_name(model)
    if family is None or family.startswith("qwen3"):
        return tiny_inputs(model, text_lengths, images_per_prompt=images_per_prompt, grid=16, seed=seed)
    if images_per_prompt != 1:
        raise ValueError(f"images_per_prompt={images_per_prompt}: the {family} matrix inputs hold one image")
    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    questions = tuple(
        "".join(letters[i] for i in torch.randint(0, len(letters), (n,), generator=gen).tolist())
        for n in text_lengths
    )
    sizes = ((MATRIX_IMAGES[family],),) * len(text_lengths)
    return tiny_family_inputs(family, sizes=sizes, questions=questions, seed=seed)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---- shared helpers (import them from conftest) ---------------------------------------


def split_sample(inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch, without its padding (every prompt holds the same number of
    images; per-image tensors are sliced by image, per-prompt ones by prompt)."""
    keep = inputs["attention_mask"][b].bool()
    batch = inputs["input_ids"].shape[0]
    single = {
        "input_ids": inputs["input_ids"][b][keep][None],
        "attention_mask": inputs["attention_mask"][b][keep][None],
    }
    if "mm_token_type_ids" in inputs:
        single["mm_token_type_ids"] = inputs["mm_token_type_ids"][b][keep][None]
    if "image_grid_thw" in inputs:  # Qwen: pixel rows are patches, image by image
        # images of different sizes: count each sample's images from its runs of image tokens
        visual = inputs["mm_token_type_ids"] == 1
        starts = visual & ~torch.nn.functional.pad(visual[:, :-1], (1, 0), value=False)
        first = int(starts[:b].sum())
        grids = inputs["image_grid_thw"][first : first + int(starts[b].sum())]
        patches = inputs["image_grid_thw"].prod(dim=1)
        begin = int(patches[:first].sum())
        single["pixel_values"] = inputs["pixel_values"][begin : begin + int(grids.prod(dim=1).sum())]
        single["image_grid_thw"] = grids
        return single
    if "image_sizes" in inputs:  # LLaVA-NeXT / OneVision: one row per image
        n_img = inputs["image_sizes"].shape[0] // batch
        for key in ("pixel_values", "image_sizes"):
            single[key] = inputs[key][b * n_img : (b + 1) * n_img]
        if "batch_num_images" in inputs:
            single["batch_num_images"] = inputs["batch_num_images"][b : b + 1]
        return single
    if "pixel_attention_mask" in inputs:  # Idefics3 / SmolVLM: one row of tiles per prompt
        for key in ("pixel_values", "pixel_attention_mask"):
            single[key] = inputs[key][b : b + 1]
        return single
    pixels = inputs["pixel_values"]
    visual = (inputs["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist()
    # LLaVA: one row per image; InternVL: one row per tile, tiles in proportion to image tokens
    rows = [pixels.shape[0] * v // sum(visual) for v in visual]
    single["pixel_values"] = pixels[sum(rows[:b]) : sum(rows[: b + 1])]
    return single


def merge_samples(model, a: dict, b: dict) -> dict:
    """Left-pad two single-sample inputs of different lengths into one batch."""
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    merged = {
        "input_ids": torch.cat([pad(a["input_ids"], PAD_TOKEN), pad(b["input_ids"], PAD_TOKEN)]),
        "attention_mask": torch.cat([pad(a["attention_mask"], 0), pad(b["attention_mask"], 0)]),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
    }
    if "image_grid_thw" in a:
        merged["image_grid_thw"] = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
        types = [pad(x["mm_token_type_ids"], 0) for x in (a, b)]
        merged["mm_token_type_ids"] = torch.cat(types)
    return merged


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
