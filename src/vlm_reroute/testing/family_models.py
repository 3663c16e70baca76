"""Tiny random-weight models of the VLM families in use now, as the real ``transformers`` classes.

Qwen3-VL (+ MoE), Qwen3.5, LLaVA-NeXT, LLaVA-OneVision, InternVL3, Idefics3 and SmolVLM, each
built from a config (no download) with the shapes of :class:`~vlm_reroute.testing.models.TextShape`
(8 decoder layers, hidden 64) and a two- or three-layer vision tower. The vision sizes are small
but keep each family's layout rules: Qwen's 2x2 merge of 16-pixel patches, LLaVA-NeXT's base image
plus anyres crops with ``image_newline``, OneVision's anyres-max interpolation, InternVL's 0.5 pixel
shuffle per tile, Idefics3 / SmolVLM's tiles plus a global image. Special token ids live at the top
of the 512-token tiny vocabulary (:data:`SPECIALS`).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from transformers import PreTrainedModel

from ..families import FAMILIES
from .models import FAMILIES as FIRST_KIT
from .models import PAD_TOKEN, VOCAB, TextShape, _init_weights

# the families this kit builds (the others are the first kit's, :mod:`.models`), classes from the table
FAMILY_CLASSES = {f.name: f.model_class for f in FAMILIES if f.name not in FIRST_KIT}
NEW_FAMILIES = tuple(FAMILY_CLASSES)

_QWEN = {
    "<|im_start|>": VOCAB - 6,
    "<|im_end|>": VOCAB - 5,
    "<|vision_start|>": VOCAB - 4,
    "<|vision_end|>": VOCAB - 3,
    "<|video_pad|>": VOCAB - 2,
    "<|image_pad|>": VOCAB - 1,
}
_IDEFICS = {
    **{f"<row_{r}_col_{c}>": VOCAB - 40 + 6 * (r - 1) + (c - 1) for r in range(1, 7) for c in range(1, 7)},
    "<end_of_utterance>": VOCAB - 4,
    "<global-img>": VOCAB - 3,
    "<fake_token_around_image>": VOCAB - 2,
    "<image>": VOCAB - 1,
}
# Special tokens of each family's tiny tokenizer, at fixed ids (the image token is always VOCAB - 1).
SPECIALS: dict[str, dict[str, int]] = {
    "qwen3_vl": _QWEN,
    "qwen3_vl_moe": _QWEN,
    "qwen3_5": _QWEN,
    "llava_next": {"<image>": VOCAB - 1},
    "llava_onevision": {
        "<|im_start|>": VOCAB - 6,
        "<|im_end|>": VOCAB - 5,
        "<video>": VOCAB - 2,
        "<image>": VOCAB - 1,
    },
    "internvl": {
        "<|im_start|>": VOCAB - 6,
        "<|im_end|>": VOCAB - 5,
        "<video>": VOCAB - 4,
        "<img>": VOCAB - 3,
        "</img>": VOCAB - 2,
        "<IMG_CONTEXT>": VOCAB - 1,
    },
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
}
IMAGE_TOKEN = VOCAB - 1

# Vision sizes of the tiny models (pixels); the processors in ``family_inputs`` use the same.
QWEN_PATCH = 16  # Qwen3-VL / Qwen3.5: 16-pixel patches, 2x2 merge -> one token per 32x32 pixels
LLAVA_NEXT_BASE = 56  # CLIP 56 px / patch 14 -> 4x4 = 16 tokens per crop (336 / 14 -> 24x24 in real ones)
ONEVISION_BASE = 56  # SigLIP 56 px / patch 14 -> 16 tokens per crop (384 / 14 -> 27x27 in real ones)
INTERNVL_TILE = 112  # 112 / 14 = 8x8 patches -> pixel shuffle 0.5 -> 16 tokens per tile (448 -> 256)
IDEFICS_TILE = 112  # 112 / 14 = 8x8 patches -> pixel shuffle 2 -> 16 tokens per tile (364 -> 169)


def _text_kwargs(shape: TextShape, kv_default: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or kv_default,
        max_position_embeddings=32768,
        pad_token_id=PAD_TOKEN,
        bos_token_id=None,
        eos_token_id=None,
    )


def _interleaved_section(half: int) -> list[int]:
    """Interleaved MRoPE t/h/w split of ``half`` rotary frequencies, as Qwen3-VL's [24, 20, 20] of 64."""
    hw = (half * 20) // 64 or 1
    return [half - 2 * hw, hw, hw]


def _qwen3_vl(shape: TextShape, moe: bool) -> tf.PreTrainedConfig:
    head_dim = shape.hidden // shape.heads
    text = _text_kwargs(shape, max(1, shape.heads // 2))
    text.update(
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _interleaved_section(head_dim // 2),
            "mrope_interleaved": True,
        },
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=shape.ffn // 2)
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=QWEN_PATCH,
        out_hidden_size=shape.hidden,
        num_position_embeddings=64,
        # every vision layer feeds DeepStack: 3 injections, after decoder layers 0, 1 and 2 (as in the
        # real 2B/4B/8B models, whose deepstack_visual_indexes are [5, 11, 17] / [8, 16, 24])
        deepstack_visual_indexes=[0, 1, 2],
    )
    ids: dict[str, Any] = {k: _QWEN[v] for k, v in _QWEN_IDS.items()}
    cls = tf.Qwen3VLMoeConfig if moe else tf.Qwen3VLConfig
    return cls(vision_config=vision, text_config=text, **ids)


_QWEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _qwen3_5(shape: TextShape, full_attention_interval: int = 2) -> tf.PreTrainedConfig:
    """Hybrid decoder: ``full_attention_interval=2`` gives linear, full, linear, full, ... (the real
    checkpoints use 4: three Gated DeltaNet layers, then one full-attention layer)."""
    head_dim = 2 * shape.hidden // shape.heads  # decoupled from hidden / heads, as in the real models
    text = _text_kwargs(shape, max(1, shape.heads // 2))
    text.update(
        head_dim=head_dim,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=[
            "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
            for i in range(shape.layers)
        ],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,  # real: 0.25 of head_dim 256 -> 64 rotary dims
            "mrope_section": _interleaved_section(head_dim // 8),
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=QWEN_PATCH,
        out_hidden_size=shape.hidden,
        num_position_embeddings=64,
    )
    ids: dict[str, Any] = {k: _QWEN[v] for k, v in _QWEN_IDS.items()}
    return tf.Qwen3_5Config(vision_config=vision, text_config=text, **ids)


def anyres_pinpoints(base: int, max_side: int) -> list[list[int]]:
    """All (height, width) multiples of ``base`` up to ``max_side`` crops a side (OneVision's grid)."""
    return [[base * i, base * j] for i in range(1, max_side + 1) for j in range(1, max_side + 1)]


# LLaVA-NeXT's five resolutions (2x1, 1x2, 2x2, 3x1, 1x3 crops of 336), scaled to the tiny base
LLAVA_NEXT_PINPOINTS = [
    [LLAVA_NEXT_BASE * h, LLAVA_NEXT_BASE * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
]
ONEVISION_PINPOINTS = anyres_pinpoints(ONEVISION_BASE, 6)


def _llava_next(shape: TextShape) -> tf.PreTrainedConfig:
    vision = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=LLAVA_NEXT_BASE,
        patch_size=14,
        projection_dim=32,
    )
    text = tf.LlamaConfig(**_text_kwargs(shape, shape.heads))
    return tf.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(LLAVA_NEXT_BASE // 14) ** 2,
    )


def _llava_onevision(shape: TextShape) -> tf.PreTrainedConfig:
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=ONEVISION_BASE,
        patch_size=14,
        vision_use_head=False,
    )
    text = tf.Qwen2Config(**_text_kwargs(shape, max(1, shape.heads // 2)))
    return tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        video_token_index=SPECIALS["llava_onevision"]["<video>"],
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def _internvl(shape: TextShape) -> tf.PreTrainedConfig:
    vision = tf.InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[INTERNVL_TILE, INTERNVL_TILE],
        patch_size=[14, 14],
    )
    text = tf.Qwen2Config(**_text_kwargs(shape, max(1, shape.heads // 2)))
    return tf.InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=(INTERNVL_TILE // 14) ** 2 // 4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _idefics3(shape: TextShape, smol: bool) -> tf.PreTrainedConfig:
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IDEFICS_TILE,
        patch_size=14,
    )
    text = tf.LlamaConfig(**_text_kwargs(shape, max(1, shape.heads // 2)))
    cls = tf.SmolVLMConfig if smol else tf.Idefics3Config
    return cls(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, scale_factor=2)


def tiny_family_config(family: str, shape: TextShape | None = None, **options) -> tf.PreTrainedConfig:
    """The config of a tiny ``family`` model (``options``: ``full_attention_interval`` for qwen3_5)."""
    shape = shape or TextShape()
    if family not in FAMILY_CLASSES:
        raise ValueError(f"family={family!r}: allowed are {', '.join(NEW_FAMILIES)}")
    if options and family != "qwen3_5":
        raise ValueError(f"options {sorted(options)} are not accepted for family={family!r}")
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        return _qwen3_vl(shape, moe=family == "qwen3_vl_moe")
    if family == "qwen3_5":
        return _qwen3_5(shape, **options)
    if family == "llava_next":
        return _llava_next(shape)
    if family == "llava_onevision":
        return _llava_onevision(shape)
    if family == "internvl":
        return _internvl(shape)
    return _idefics3(shape, smol=family == "smolvlm")


def tiny_family_model(
    family: str,
    shape: TextShape | None = None,
    attn_implementation: str = "sdpa",
    std: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **options,
) -> PreTrainedModel:
    """A tiny random ``family`` model of the real class (see :data:`FAMILY_CLASSES`), in eval mode.

    ``std`` 0.2 makes attention far from uniform, so top-k decisions have no ties.
    """
    config = tiny_family_config(family, shape, **options)
    config._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        getattr(config, sub)._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(tf, FAMILY_CLASSES[family])(config)
    return _init_weights(model, std, seed).to(dtype)  # type: ignore[arg-type]  # transformers' functools.wraps'd .to: typeshed's _Wrapped binds no self
