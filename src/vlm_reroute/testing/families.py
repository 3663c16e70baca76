"""Tiny models, processors, inputs and saved checkpoints of the VLM families in use now.

One entry point for the tests and the adapters' authors: :func:`tiny_family_model` builds a random
model of the real class (:data:`FAMILY_CLASSES`), :func:`tiny_family_inputs` the processor output
for a left-padded batch with one and two images of different sizes, and
:func:`save_tiny_family_checkpoint` a folder laid out as the family's Hub checkpoints are, which
``AutoModelForImageTextToText`` and the tokenizer / image processor (the whole ``AutoProcessor``
where the family's processor needs no torchvision) load offline. See ``docs/families-notes.md``
for what each family's layout means for routing.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers as tf

from ..families import family_of_config
from .family_inputs import (
    OFFLINE_PROCESSORS,
    PROCESSORS,
    FamilyProcessor,
    prompt_text,
    random_image,
    tiny_family_inputs,
    tiny_family_processor,
)
from .family_models import (
    FAMILY_CLASSES,
    IMAGE_TOKEN,
    NEW_FAMILIES,
    SPECIALS,
    tiny_family_config,
    tiny_family_model,
)

__all__ = [
    "FAMILY_CLASSES",
    "IMAGE_TOKEN",
    "NEW_FAMILIES",
    "SPECIALS",
    "FamilyProcessor",
    "family_of",
    "load_family_processor",
    "prompt_text",
    "random_image",
    "save_tiny_family_checkpoint",
    "tiny_family_config",
    "tiny_family_inputs",
    "tiny_family_model",
    "tiny_family_processor",
]


def family_of(config: tf.PreTrainedConfig) -> str:
    """The family name of a newer-family model config, or a ValueError naming the known ones."""
    try:
        family = family_of_config(config).name
    except ValueError:
        family = None
    if family not in NEW_FAMILIES:
        raise ValueError(f"model_type={config.model_type!r} is none of {', '.join(NEW_FAMILIES)}")
    return family


def save_tiny_family_checkpoint(family: str, path: str | Path, **model_kwargs) -> Path:
    """Write a tiny ``family`` model, its tokenizer, image processor and processor config to ``path``.

    Where the processor class can be built offline (LLaVA-NeXT, Idefics3) it is saved whole. The
    others hold a video processor, which needs torchvision: their folder has what a Hub checkpoint
    of the family has without it — tokenizer files with the chat template, ``preprocessor_config.json``
    and a ``processor_config.json`` with the processor's own arguments (``num_image_tokens``,
    ``image_seq_length``, ...) — which :func:`load_family_processor` reads back.
    """
    path = Path(path)
    model = tiny_family_model(family, **model_kwargs)
    bundle = tiny_family_processor(family)
    model.generation_config.pad_token_id = bundle.tokenizer.pad_token_id
    model.save_pretrained(path)
    if bundle.processor is not None:
        bundle.processor.save_pretrained(path)
        return path
    bundle.tokenizer.save_pretrained(path)
    bundle.image_processor.save_pretrained(path)
    cls_name, kwargs = PROCESSORS[family]
    config = {**kwargs, "processor_class": cls_name}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def load_family_processor(path: str | Path) -> FamilyProcessor:
    """Tokenizer, image processor, processor arguments (and the processor where it loads) of a folder."""
    config = tf.AutoConfig.from_pretrained(path)
    family = family_of(config)
    if family in OFFLINE_PROCESSORS:
        processor = tf.AutoProcessor.from_pretrained(path)
        kwargs = {k: getattr(processor, k) for k in PROCESSORS[family][1]}
        return FamilyProcessor(family, processor.tokenizer, processor.image_processor, processor, kwargs)
    saved = json.loads((Path(path) / "processor_config.json").read_text())
    kwargs = {k: v for k, v in saved.items() if k != "processor_class"}
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    image_processor = tf.AutoImageProcessor.from_pretrained(path)
    return FamilyProcessor(family, tokenizer, image_processor, None, kwargs)
