"""The demo model: a real ``LlavaForConditionalGeneration`` and ``LlavaProcessor``, built from configs.

Shape (defaults of :class:`DemoShape`): a CLIP vision tower at 224 px with 16-px patches (14 × 14 =
196 visual tokens; the CLS token is dropped by ``vision_feature_select_strategy="default"``, so the
processor's ``num_additional_image_tokens=1`` gives the same count), LLaVA's two-layer GELU
projector and a 12-layer Llama decoder. 196 tokens leave 22 at the papers' 88.9 % reduction, and
12 layers let FastV's and PDrop's decision layers (scaled from 32) fall on distinct layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..loading import quiet_transformers
from .draw import PATCH, SIZE
from .vocab import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, build_tokenizer, vocabulary


@dataclass(frozen=True)
class DemoShape:
    """Widths and depths of the demo model (the vision tower's heads are 64-wide, the decoder's 32).

    The model is LLaVA-1.5's layout (arXiv 2310.03744: a CLIP tower, a two-layer GELU projector,
    a Llama decoder) at a size trained on a CPU; 12 layers let FastV's and PDrop's decision layers,
    scaled from 32, fall on distinct layers.
    """

    vision_width: int = 192
    vision_layers: int = 4
    width: int = 192
    layers: int = 12
    heads: int = 6
    ffn_mult: int = 4


def build_model(shape: DemoShape = DemoShape(), seed: int = 0) -> Any:
    """A freshly initialised demo LLaVA (float32) with the generation settings the demo uses."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_width,
        intermediate_size=shape.vision_width * shape.ffn_mult,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=max(1, shape.vision_width // 64),
        image_size=SIZE,
        patch_size=PATCH,
        projection_dim=shape.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=shape.width,
        intermediate_size=shape.width * shape.ffn_mult * 2 // 3 // 16 * 16,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=(SIZE // PATCH) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    with quiet_transformers():
        model = LlavaForConditionalGeneration(config)
    _init_positions(model)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = PAD_ID, EOS_ID, BOS_ID
    gen.max_new_tokens, gen.do_sample = 12, False
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """``grid²`` × ``dim`` fixed 2-D sine-cosine position codes (rows, then columns), as in MAE."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(codes, (0, dim - codes.shape[1]))


def _init_positions(model: Any, scale: float = 0.7) -> None:
    """Start the vision tower's (learned) position embeddings at 2-D sine-cosine codes.

    A box is absolute: the decoder can only read where a visual token is from the token itself (its
    RoPE positions are relative, and the prompt before the image varies in length). CLIP's default
    initialisation (std 0.02) makes positions ~25x weaker than the patch content at the input, and a
    first run here learned colours within minutes but no position in 750 steps (a linear probe of the
    projector output predicted the same box for every patch). Codes of the content's scale fix that
    from the first step; they remain ordinary trainable weights of the checkpoint.
    """
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings  # transformers 5 flattened CLIPVisionModel
    weight = embeddings.position_embedding.weight
    grid = int(round((weight.shape[0] - 1) ** 0.5))
    with torch.no_grad():
        weight[1:] = scale * sincos_2d(grid, weight.shape[1])
        weight[0] = 0.0  # the CLS slot (dropped by the "default" feature strategy)


def build_processor() -> Any:
    """``LlavaProcessor`` = CLIP image processor (224 px) + the word-level tokenizer + chat template."""
    with quiet_transformers():
        from transformers import CLIPImageProcessor, LlavaProcessor

        image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=SIZE)
        tokenizer = build_tokenizer()
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )


def save(model: Any, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (cast to ``dtype`` if given) and the processor as a Hub-style folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(folder)
        build_processor().save_pretrained(folder)
    return folder


def count_parameters(model: Any) -> dict[str, int]:
    """Parameters of the vision tower, projector and decoder (embeddings and head included)."""
    inner = model.model
    parts = {
        "vision": inner.vision_tower,
        "projector": inner.multi_modal_projector,
        "decoder": inner.language_model,
        "head": model.lm_head,
    }
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
