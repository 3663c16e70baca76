"""Tiny random-weight VLMs of the real ``transformers`` classes, and inputs for them.

Used by the tests, the examples and the CPU benchmarks: no weights are downloaded, yet every
code path (vision tower, placeholder merge, RoPE / MRoPE, cache, ``generate``) is the library's
own. Weights are drawn with a large std so that attention is far from uniform and top-k
decisions have no ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
VOCAB = 512
# Special ids inside the tiny vocabulary (real checkpoints carry their own in the config).
IMAGE_TOKEN = VOCAB - 1
VISION_START, VISION_END, VIDEO_TOKEN = VOCAB - 4, VOCAB - 3, VOCAB - 2
PAD_TOKEN = 0


@dataclass
class TextShape:
    """Decoder shape of a tiny model (defaults: 8 layers, hidden 64, as the tests use)."""

    layers: int = 8
    hidden: int = 64
    heads: int = 4
    kv_heads: int | None = None  # None: MHA for LLaVA, GQA (heads // 2) for Qwen
    ffn: int = 128


def _init_weights(model: PreTrainedModel, std: float, seed: int) -> PreTrainedModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or p.ndim == 1:
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def tiny_llava(
    shape: TextShape | None = None,
    image_size: int = 336,
    attn_implementation: str = "sdpa",
    std: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab: int = VOCAB,
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model: CLIP tower (patch 14, 336 px → 576 tokens), Llama decoder.

    ``vocab`` ≥ ``VOCAB`` widens the embedding and LM head only (benchmarks use 32000 so the head
    costs what a real one does); the special ids stay those of the tiny vocabulary.
    """
    shape = shape or TextShape()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
    )
    _check_vocab(vocab)
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        max_position_embeddings=32768,
        pad_token_id=PAD_TOKEN,
        bos_token_id=None,
        eos_token_id=None,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(image_size // 14) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return _init_weights(model, std, seed).to(dtype)  # type: ignore[arg-type]  # transformers' functools.wraps'd .to: typeshed's _Wrapped binds no self


def _check_vocab(vocab: int) -> None:
    if vocab < VOCAB:
        raise ValueError(f"vocab={vocab}: must be ≥ {VOCAB} (the tiny special token ids live below it)")


def _mrope_section(shape: TextShape) -> list[int]:
    """Qwen's t/h/w split of the rotary half-dimension (2:3:3, as [16, 24, 24] of 64 in Qwen2-VL-7B)."""
    half = shape.hidden // shape.heads // 2
    return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


def _qwen_text_kwargs(shape: TextShape, vocab: int = VOCAB) -> dict:
    _check_vocab(vocab)
    return dict(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or max(1, shape.heads // 2),
        max_position_embeddings=32768,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(shape),
        },
        pad_token_id=PAD_TOKEN,
        bos_token_id=None,
        eos_token_id=None,
    )


_QwenConfig = TypeVar("_QwenConfig", Qwen2VLConfig, Qwen2_5_VLConfig)


def _ready(config: _QwenConfig, attn_implementation: str, seed: int) -> _QwenConfig:
    """``config`` with ``attn_implementation`` set (its text config's too), torch seeded with ``seed``."""
    config._attn_implementation = attn_implementation
    text_config = config.text_config  # typed as the constructor's argument: dict | config | None
    assert isinstance(text_config, PreTrainedConfig)  # the constructor built it from the kwargs
    text_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return config


def tiny_qwen2_vl(
    shape: TextShape | None = None,
    attn_implementation: str = "sdpa",
    std: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    version: str = "2",
    vocab: int = VOCAB,
) -> PreTrainedModel:
    """A Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) shaped model with GQA and MRoPE.

    ``vocab`` as in :func:`tiny_llava`.
    """
    shape = shape or TextShape()
    common: dict[str, Any] = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        text_config=_qwen_text_kwargs(shape, vocab),
    )
    model: PreTrainedModel
    vision: dict[str, Any]
    if version == "2":
        vision = dict(
            depth=1, embed_dim=32, hidden_size=shape.hidden, num_heads=2, mlp_ratio=2, patch_size=14
        )
        config = Qwen2VLConfig(vision_config=vision, **common)
        model = Qwen2VLForConditionalGeneration(_ready(config, attn_implementation, seed))
    elif version == "2.5":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=shape.hidden,
            num_heads=2,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=[1],
        )
        config25 = Qwen2_5_VLConfig(vision_config=vision, **common)
        model = Qwen2_5_VLForConditionalGeneration(_ready(config25, attn_implementation, seed))
    else:
        raise ValueError(f"version={version!r}: allowed are '2' and '2.5'")
    return _init_weights(model, std, seed).to(dtype)  # type: ignore[arg-type]  # transformers' functools.wraps'd .to: typeshed's _Wrapped binds no self


def tiny_model(family: str, **kwargs) -> PreTrainedModel:
    """Build a tiny model of ``family`` (one of :data:`FAMILIES`)."""
    if family == "llava":
        return tiny_llava(**kwargs)
    if family == "qwen2_vl":
        return tiny_qwen2_vl(version="2", **kwargs)
    if family == "qwen2_5_vl":
        return tiny_qwen2_vl(version="2.5", **kwargs)
    raise ValueError(f"family={family!r}: allowed are {', '.join(FAMILIES)}")


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return ids, mask


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, VOCAB - 8, (n,), generator=gen).tolist()


def tiny_inputs(
    model: PreTrainedModel,
    text_lengths: list[int] | tuple[int, ...] = (20,),
    images_per_prompt: int = 1,
    grid: int = 48,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Processor-shaped inputs for a batch of prompts (left-padded when lengths differ).

    Each prompt is ``[system text] <image>*images_per_prompt [question text]``; ``text_lengths``
    sets the question length per prompt. For Qwen, ``grid`` is the patch grid side (48 → 576
    merged tokens per image) and ``mm_token_type_ids`` is returned as the processor does.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = model.dtype
    cfg = model.config
    batch = len(text_lengths)
    rows: list[list[int]] = []
    if isinstance(model, LlavaForConditionalGeneration):
        n_img = cfg.image_seq_length
        for tl in text_lengths:
            rows.append(_text(gen, 5) + [IMAGE_TOKEN] * n_img * images_per_prompt + _text(gen, tl))
        ids, mask = _left_pad(rows)
        size = cfg.vision_config.image_size
        pixels = torch.randn(batch * images_per_prompt, 3, size, size, generator=gen).to(dtype)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    merge = cfg.vision_config.spatial_merge_size
    n_img = grid * grid // (merge * merge)
    block = [VISION_START] + [IMAGE_TOKEN] * n_img + [VISION_END]
    for tl in text_lengths:
        rows.append(_text(gen, 5) + block * images_per_prompt + _text(gen, tl))
    ids, mask = _left_pad(rows)
    vc = cfg.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    n_images = batch * images_per_prompt
    pixels = torch.randn(n_images * grid * grid, patch_dim, generator=gen).to(dtype)
    thw = torch.tensor([[1, grid, grid]] * n_images)
    mm_types = (ids == IMAGE_TOKEN).to(torch.int)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": thw,
        "mm_token_type_ids": mm_types,
    }
