"""Shared by the Nüwa engine tests (``tests/methods/test_nuwa_*.py``): tiny eager models,
left-padded Qwen2.5-VL inputs built from patch grids, the stage-2 scorer settings of each
convention, a pre-hook that keeps what a decoder layer receives, and tie-free salience maps
for the stage-1 tests."""

from __future__ import annotations

import math
from functools import cache

import torch

from vlm_reroute.testing.models import IMAGE_TOKEN, PAD_TOKEN, VISION_END, VISION_START, VOCAB, tiny_model

FAMILIES = ["llava", "qwen2_5_vl"]


@cache
def eager_model(family: str):
    size = {"image_size": 112} if family == "llava" else {}
    return tiny_model(family, attn_implementation="eager", **size)


def qwen_inputs(model, samples: list[tuple[list[tuple[int, int]], int]], seed: int = 0) -> dict:
    """Left-padded Qwen2.5-VL inputs: per sample its images' patch grids (h, w) and question length."""
    gen = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    rows, grids = [], []
    for images, question in samples:
        ids = torch.randint(1, VOCAB - 8, (5,), generator=gen).tolist()
        for h, w in images:
            ids += [VISION_START] + [IMAGE_TOKEN] * (h * w // 4) + [VISION_END]
            grids.append([1, h, w])
        rows.append(ids + torch.randint(1, VOCAB - 8, (question,), generator=gen).tolist())
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_TOKEN)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    thw = torch.tensor(grids)
    pixels = torch.randn(int(thw.prod(dim=1).sum()), patch_dim, generator=gen)
    types = (ids == IMAGE_TOKEN).int()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": thw,
        "mm_token_type_ids": types,
    }


def stage2_scorer(family: str, official: bool) -> dict:
    if family == "llava":
        return {"rows": 1, "heads": "mean", "causal": True}
    return {"rows": 3, "heads": "max", "causal": not official}


def capture(model, layer: int, what: str):
    """A pre-hook on decoder ``layer`` (registered after the method's) that keeps ``what`` per call."""
    seen = []

    def grab(_module, args, kwargs):
        value = kwargs[what]
        seen.append(value[0].clone() if isinstance(value, tuple) else value.clone())

    return seen, model.model.language_model.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)


def distinct(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Positive, pairwise distinct salience (no ties, like real attention)."""
    gen = torch.Generator().manual_seed(seed)
    n = height * width
    return torch.stack([(torch.randperm(n, generator=gen) + 1).float() / n for _ in range(batch)]).view(
        batch, height, width
    )


def ref_select(sal: torch.Tensor, n: int, k1: int) -> list[int]:
    """Loops over cells as the spec words it; padding is the lowest score; ties to the earlier position."""
    height, width = sal.shape
    cand = []
    for cy in range(0, height + height % 2, 2):
        for cx in range(0, width + width % 2, 2):
            cell = [(y, x) for y in (cy, cy + 1) for x in (cx, cx + 1)]
            scored = [
                (-(float(sal[y, x]) if y < height and x < width else -math.inf), i, y, x)
                for i, (y, x) in enumerate(cell)
            ]
            cand += [(s, y, x) for s, _, y, x in sorted(scored)[:n]]
    ranked = sorted(cand, key=lambda c: (c[0], c[1] * (width + 1) + c[2]))[:k1]
    return sorted(y * width + x for _, y, x in ranked if y < height and x < width)
