"""Save a tiny random VLM *with its processor* to a folder, as a Hub checkpoint would be laid out.

The loading code of the command line (``AutoProcessor`` / ``from_pretrained``) is the one users
run on real checkpoints; these folders let it run offline, in the tests and in the README's
commands. The tokenizer is character-level (a BPE with no merges) plus the family's special
tokens at the ids the tiny configs use. Saving is quiet: the expected "falls back to the PIL
image processor" notice (no torchvision) and the shard-writing bar are silenced.

Every family of :data:`vlm_reroute.families.FAMILIES` is saved by :func:`save_tiny_checkpoint`: LLaVA-1.5,
Qwen2-VL and Qwen2.5-VL by the first kit (:mod:`.models`, configurable ``image_size``), the others by
:func:`.families.save_tiny_family_checkpoint` (8 layers, each family's layout rules at small sizes).

    python -m vlm_reroute.testing llava /tmp/tiny-llava
    python -m vlm_reroute.testing internvl /tmp/tiny-internvl
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, ProcessorMixin

from ..families import get_family
from ..loading import quiet_transformers
from .models import FAMILIES as FIRST_KIT
from .models import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, VOCAB, tiny_model

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: dict[str, int]) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII, with ``specials`` at fixed ids."""
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    filler = 0
    while len(vocab) < VOCAB:
        if len(vocab) in specials.values():
            name = next(k for k, v in specials.items() if v == len(vocab))
        else:
            name, filler = f"<unused{filler}>", filler + 1
        vocab[name] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    tokenizer.padding_side = "left"
    return tokenizer


def save_tiny_checkpoint(family: str, path: str | Path, **model_kwargs) -> Path:
    """Write a tiny ``family`` model and a matching processor to ``path`` (created), quietly.

    ``family`` is any name of :func:`vlm_reroute.families.family_names`; ``model_kwargs`` go to the
    family's tiny model (``shape=TextShape(layers=32)``, ``seed``, ``std``; ``image_size`` for LLaVA-1.5).
    The folder loads with the Auto classes, :func:`vlm_reroute.pipeline`, every ``vlm-reroute`` command
    and the lmms-eval model ``vlm_reroute``.
    """
    get_family(family)  # an unknown name: one error listing the families
    with quiet_transformers():
        if family in FIRST_KIT:
            return _save(family, Path(path), **model_kwargs)
        from .families import save_tiny_family_checkpoint

        return save_tiny_family_checkpoint(family, Path(path), **model_kwargs)


def _save(family: str, path: Path, **model_kwargs) -> Path:
    # imported here, under quiet_transformers: without torchvision the lazy import itself warns
    from transformers import CLIPImageProcessor, LlavaProcessor, Qwen2VLImageProcessor

    model = tiny_model(family, **model_kwargs)
    processor: ProcessorMixin | BaseImageProcessor  # what is saved beside the model
    if family == "llava":
        tokenizer = _tokenizer({"<image>": IMAGE_TOKEN})
        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size)
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=model.config.vision_config.patch_size,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
    else:
        specials = {
            "<|vision_start|>": VISION_START,
            "<|vision_end|>": VISION_END,
            "<|video_pad|>": VIDEO_TOKEN,
            "<|image_pad|>": IMAGE_TOKEN,
            "<|im_start|>": VOCAB - 6,
            "<|im_end|>": VOCAB - 5,
        }
        tokenizer = _tokenizer(specials)
        tokenizer.chat_template = QWEN_TEMPLATE
        # at most 576 merged tokens (672 x 672 pixels), the paper's Qwen setting (max_pixels=451584)
        processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=672 * 672)
        # Qwen2VLProcessor also needs a video processor, which needs torchvision (absent here):
        # save tokenizer and image processor; vlm_reroute.loading assembles the inputs from them.
        tokenizer.save_pretrained(path)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
