"""Processors and processor-shaped inputs for the tiny family models of :mod:`.family_models`.

Each family gets its real image processor class (the PIL backend, sized to the tiny vision tower)
and a character-level tokenizer with the family's special tokens. Where the family's processor
class can be built offline, it makes the inputs (LLaVA-NeXT, Idefics3). The others take a video
processor in their constructor, and video processors need torchvision; for them the text is
expanded here by the rule the processor applies (``processing_*.py`` named in each function), on
the real image processor's output, so the layout the model receives is the real one:

- Qwen3-VL / Qwen3.5: ``<|image_pad|>`` x ``grid_t*grid_h*grid_w / merge**2`` inside the prompt's
  ``<|vision_start|>..<|vision_end|>``, and ``mm_token_type_ids`` (1 on image pads).
- LLaVA-OneVision: alone in its prompt an image gets ``_get_number_of_features`` placeholders
  (base crop + unpadded anyres grid, shrunk past anyres_max_9, + one newline per row); with other
  images in the prompt only ``num_image_tokens + 1`` (base crop + newline), and ``batch_num_images``.
- InternVL: ``<img>`` + ``<IMG_CONTEXT>`` x 16 per tile (tiles, then the thumbnail) + ``</img>``.
- SmolVLM: the real ``processing_smolvlm.get_image_prompt_string`` (its ``num2words`` import is
  optional): per tile ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` x 16, ``\\n`` per
  row, then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x 16 + ``<fake_token_around_image>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.image_processing_utils import select_best_resolution
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from .family_models import (
    IDEFICS_TILE,
    INTERNVL_TILE,
    LLAVA_NEXT_BASE,
    LLAVA_NEXT_PINPOINTS,
    NEW_FAMILIES,
    ONEVISION_BASE,
    ONEVISION_PINPOINTS,
    QWEN_PATCH,
    SPECIALS,
)
from .models import VOCAB

# How a prompt marks one image before expansion, and the prompt around it.
_FORMATS = {
    "qwen": (
        "<|im_start|>user\n",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llava_next": ("USER: ", "<image>\n", " ASSISTANT:"),
    "llava_onevision": ("<|im_start|>user ", "<image>\n", "<|im_end|><|im_start|>assistant\n"),
    "internvl": ("<|im_start|>user\n", "<IMG_CONTEXT>\n", "<|im_end|>\n<|im_start|>assistant\n"),
    "idefics": ("User:", "<image>", "<end_of_utterance>\nAssistant:"),
}
_FORMAT_OF = {
    "qwen3_vl": "qwen",
    "qwen3_vl_moe": "qwen",
    "qwen3_5": "qwen",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "internvl": "internvl",
    "idefics3": "idefics",
    "smolvlm": "idefics",
}
# Image sizes (height, width) of the default batch: prompt 0 has one image, prompt 1 two of other sizes.
DEFAULT_IMAGES: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {
    "qwen": (((96, 128),), ((128, 64), (160, 170))),
    "llava_next": (((80, 150),), ((60, 60), (150, 70))),
    "llava_onevision": (((300, 260),), ((60, 60), (150, 70))),
    "internvl": (((100, 230),), ((112, 112), (200, 120))),
    "idefics": (((150, 250),), ((60, 80), (200, 120))),
}
QUESTIONS = ("Describe it.", "What differs between these two pictures, briefly?")


def prompt_text(family: str, n_images: int, question: str) -> str:
    """The prompt a user hands the processor: one image marker per image, then the question."""
    head, marker, tail = _FORMATS[_FORMAT_OF[_check(family)]]
    return head + marker * n_images + question + tail


def chat_template(family: str) -> str:
    """A minimal chat template giving :func:`prompt_text`'s format (for saved checkpoints)."""
    head, marker, tail = _FORMATS[_FORMAT_OF[_check(family)]]
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}" + head + "{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}"
        + marker
        + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        + tail
        + "{% else %}{{ m['content'][0]['text'] }}{% endif %}{% endfor %}"
    )


def _check(family: str) -> str:
    if family not in _FORMAT_OF:
        raise ValueError(f"family={family!r}: allowed are {', '.join(NEW_FAMILIES)}")
    return family


# The processor class of each family and the arguments it is saved with (processor_config.json).
PROCESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_vl": ("Qwen3VLProcessor", {}),
    "qwen3_vl_moe": ("Qwen3VLProcessor", {}),
    "qwen3_5": ("Qwen3VLProcessor", {}),
    "llava_next": (
        "LlavaNextProcessor",
        {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
    ),
    "llava_onevision": (
        "LlavaOnevisionProcessor",
        {
            "num_image_tokens": (ONEVISION_BASE // 14) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
    ),
    "internvl": ("InternVLProcessor", {"image_seq_length": (INTERNVL_TILE // 14) ** 2 // 4}),
    "idefics3": ("Idefics3Processor", {"image_seq_len": (IDEFICS_TILE // 14) ** 2 // 4}),
    "smolvlm": ("SmolVLMProcessor", {"image_seq_len": (IDEFICS_TILE // 14) ** 2 // 4}),
}
# Families whose processor class can be built without torchvision (no video processor).
OFFLINE_PROCESSORS = ("llava_next", "idefics3")
# Named special tokens the real tokenizers carry (the processors read e.g. tokenizer.context_image_token).
_NAMED_TOKENS = {
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "internvl": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    "smolvlm": {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>",
        "global_image_token": "<global-img>",
    },
}


@dataclass
class FamilyProcessor:
    """The tiny tokenizer and real image processor of a family, the arguments its processor class
    takes (``processor_kwargs``), and that processor where it can be built offline (else ``None``)."""

    family: str
    tokenizer: tf.PreTrainedTokenizerBase  # the tiny fast one, or what AutoTokenizer loads from a folder
    image_processor: Any
    processor: Any = None
    processor_kwargs: dict[str, Any] = field(default_factory=dict)


def _family_tokenizer(family: str) -> tf.PreTrainedTokenizerFast:
    """Character-level tokenizer (a BPE with no merges) with ``SPECIALS[family]`` at fixed ids.

    Byte-level for the Qwen families, as their real tokenizers are: ``AutoTokenizer`` loads
    Qwen3.5 checkpoints with ``Qwen3_5Tokenizer``, which imposes a byte-level pre-tokenizer.
    """
    specials = SPECIALS[family]
    byte_level = _FORMAT_OF[family] == "qwen"
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for code in [*range(32, 127), 10]:
        # byte-level alphabet: printable ASCII maps to itself, space to U+0120, newline to U+010A
        vocab[chr(code) if not byte_level or 32 < code < 127 else chr(0x100 + code)] = len(vocab)
    by_id = {i: name for name, i in specials.items()}
    filler = 0
    while len(vocab) < VOCAB:
        if len(vocab) in by_id:
            vocab[by_id[len(vocab)]] = len(vocab)
        else:
            vocab[f"<unused{filler}>"], filler = len(vocab), filler + 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if byte_level:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
    else:
        core.decoder = decoders.Fuse()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_specific_special_tokens=_NAMED_TOKENS.get(family, {}),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def tiny_family_processor(family: str) -> FamilyProcessor:
    """Tokenizer, image processor (and processor where possible) matching the tiny ``family`` model."""
    kind = _FORMAT_OF[_check(family)]
    tokenizer = _family_tokenizer(family)
    kwargs = PROCESSORS[family][1]
    processor: tf.ProcessorMixin | None = None
    image_processor: tf.BaseImageProcessor
    if kind == "qwen":
        # one token per 32x32 pixels, between 4 and 36 tokens per image
        image_processor = tf.Qwen2VLImageProcessorPil(
            patch_size=QWEN_PATCH,
            temporal_patch_size=2,
            merge_size=2,
            size={"shortest_edge": 64 * 64, "longest_edge": 192 * 192},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    elif kind == "llava_next":
        image_processor = tf.LlavaNextImageProcessorPil(
            size={"shortest_edge": LLAVA_NEXT_BASE},
            crop_size={"height": LLAVA_NEXT_BASE, "width": LLAVA_NEXT_BASE},
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        )
        processor = tf.LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            **kwargs,
        )
    elif kind == "llava_onevision":
        image_processor = tf.LlavaOnevisionImageProcessorPil(
            size={"height": ONEVISION_BASE, "width": ONEVISION_BASE},
            image_grid_pinpoints=ONEVISION_PINPOINTS,
        )
    elif kind == "internvl":
        image_processor = tf.GotOcr2ImageProcessorPil(
            size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, crop_to_patches=True, max_patches=6
        )
    else:
        cls = tf.Idefics3ImageProcessorPil if family == "idefics3" else tf.SmolVLMImageProcessorPil
        image_processor = cls(
            size={"longest_edge": 3 * IDEFICS_TILE}, max_image_size={"longest_edge": IDEFICS_TILE}
        )
        if family == "idefics3":
            processor = tf.Idefics3Processor(
                image_processor=image_processor,
                tokenizer=tokenizer,
                chat_template=tokenizer.chat_template,
                **kwargs,
            )
    return FamilyProcessor(family, tokenizer, image_processor, processor, dict(kwargs))


def random_image(height: int, width: int, seed: int) -> Image.Image:
    """A deterministic noise image (noise gives every tile non-zero pixels, as Idefics3 requires)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny_family_inputs(
    family: str,
    sizes: tuple[tuple[tuple[int, int], ...], ...] | None = None,
    questions: tuple[str, ...] = QUESTIONS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bundle: FamilyProcessor | None = None,
) -> dict[str, torch.Tensor]:
    """Processor output for a left-padded batch, one prompt per entry of ``sizes``.

    ``sizes[b]`` lists the (height, width) of prompt ``b``'s images (default: one image, then two
    of other sizes: :data:`DEFAULT_IMAGES`); prompt ``b`` asks ``questions[b]``.
    """
    bundle = bundle or tiny_family_processor(_check(family))
    sizes = sizes if sizes is not None else DEFAULT_IMAGES[_FORMAT_OF[family]]
    if len(questions) < len(sizes):
        raise ValueError(f"{len(sizes)} prompts but only {len(questions)} questions")
    # an image's pixels depend on its size only, so a prompt gets the same images alone or batched
    images = [[random_image(h, w, seed + 7919 * h + w) for h, w in row] for row in sizes]
    questions = questions[: len(images)]
    texts = [prompt_text(family, len(row), q) for row, q in zip(images, questions, strict=True)]
    out = _encode(bundle, images, texts)
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in out.items()}


def _encode(bundle: FamilyProcessor, images: list[list[Image.Image]], texts: list[str]) -> dict:
    family, tok, ip, kwargs = bundle.family, bundle.tokenizer, bundle.image_processor, bundle.processor_kwargs
    kind = _FORMAT_OF[family]
    if bundle.processor is not None:
        flat = images if kind == "idefics" else [im for row in images for im in row]
        return dict(bundle.processor(images=flat, text=texts, return_tensors="pt", padding=True))
    flat = [im for row in images for im in row]
    if kind == "qwen":  # processing_qwen3_vl.py: Qwen3VLProcessor.replace_image_token
        vision = ip(images=flat, return_tensors="pt")
        counts = (vision["image_grid_thw"].prod(-1) // ip.merge_size**2).tolist()
        enc = tok(_expand(texts, "<|image_pad|>", ["<|image_pad|>" * n for n in counts]), **_TEXT)
        enc["mm_token_type_ids"] = (enc["input_ids"] == SPECIALS[family]["<|image_pad|>"]).to(torch.int)
        return {**enc, **vision}
    if kind == "llava_onevision":  # processing_llava_onevision.py: replace_image_token
        vision = ip(images=images, return_tensors="pt")
        alone = [len(row) == 1 for row in images for _ in row]
        base = kwargs["num_image_tokens"]
        counts = [
            _onevision_tokens(h, w, ip, base, kwargs["vision_aspect_ratio"]) if lone else base + 1
            for (h, w), lone in zip(vision["image_sizes"].tolist(), alone, strict=True)
        ]
        enc = tok(_expand(texts, "<image>", ["<image>" * n for n in counts]), **_TEXT)
        return {**enc, **vision}
    if kind == "internvl":  # processing_internvl.py: InternVLProcessor.replace_image_token
        vision = ip(images=flat, return_tensors="pt")
        per_tile = kwargs["image_seq_length"]
        pieces = [
            "<img>" + "<IMG_CONTEXT>" * per_tile * n + "</img>" for n in vision.pop("num_patches").tolist()
        ]
        return {**tok(_expand(texts, "<IMG_CONTEXT>", pieces), **_TEXT), **vision}
    # smolvlm, processing_smolvlm.py: SmolVLMProcessor.replace_image_token
    vision = ip(images=images, return_tensors="pt", return_row_col_info=True)
    rows = [r for row in vision.pop("rows") for r in row]
    cols = [c for col in vision.pop("cols") for c in col]
    pieces = [
        get_image_prompt_string(
            r, c, kwargs["image_seq_len"], "<fake_token_around_image>", "<image>", "<global-img>"
        )
        for r, c in zip(rows, cols, strict=True)
    ]
    return {**tok(_expand(texts, "<image>", pieces), **_TEXT), **vision}


_TEXT = {"return_tensors": "pt", "padding": True}


def _expand(texts: list[str], marker: str, pieces: list[str]) -> list[str]:
    """Replace the markers of ``texts``, in order, by ``pieces`` (one per image over the batch)."""
    found = sum(t.count(marker) for t in texts)
    if found != len(pieces):
        raise ValueError(f"{len(pieces)} images but {found} {marker!r} markers in the prompts")
    pending = iter(pieces)
    return [t.split(marker)[0] + "".join(next(pending) + rest for rest in t.split(marker)[1:]) for t in texts]


def _onevision_tokens(height: int, width: int, ip: Any, base_tokens: int, aspect: str) -> int:
    """Placeholders of a lone OneVision image: ``LlavaOnevisionProcessor._get_number_of_features``.

    Base crop, plus the anyres grid of crops unpadded to the image's aspect ratio and shrunk
    (bilinear, by ``ratio``) when it exceeds ``anyres_max_N`` base crops by 10%, plus one newline per row.
    """
    crop = ip.size.height
    side = math.isqrt(base_tokens)
    best_h, best_w = select_best_resolution((height, width), ip.image_grid_pinpoints)
    cur_h, cur_w = side * (best_h // crop), side * (best_w // crop)
    if width / height > cur_w / cur_h:
        cur_h -= 2 * ((cur_h - int(round(height * (cur_w / width), 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(width * (cur_h / height), 7))) // 2)
    unpadded, newlines = cur_h * cur_w, cur_h
    ratio = math.sqrt(cur_h * cur_w / (int(aspect.removeprefix("anyres_max_")) * side**2))
    if ratio > 1.1:
        unpadded, newlines = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
    return base_tokens + unpadded + newlines
