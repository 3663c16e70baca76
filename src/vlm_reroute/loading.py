"""Loading a checkpoint, an image and a prompt into model inputs, for the command line.

Real Hub ids and local folders go through the same ``from_pretrained`` calls. For Qwen models
whose full processor cannot be built (``Qwen2VLProcessor`` needs a video processor, which needs
torchvision), the inputs are assembled from the tokenizer and image processor exactly as the
processor would: chat template, one ``<|image_pad|>`` per merged patch, ``mm_token_type_ids``.
"""

from __future__ import annotations

import io
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .adapters import SUPPORTED_MODELS

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadError(ValueError):
    """A problem a person can fix (bad path, no network, unsupported model): one clear line."""


def load_image(source: str) -> Image.Image:
    """An RGB image from a local path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=20) as response:
                data = response.read()
        except OSError as exc:
            raise LoadError(f"cannot download image {source!r} ({exc}); pass a local file instead") from exc
        return Image.open(io.BytesIO(data)).convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise LoadError(f"image file not found: {source}")
    try:
        return Image.open(path).convert("RGB")
    except OSError as exc:
        raise LoadError(f"cannot read image {source!r}: {exc}") from exc


def quiet_transformers() -> None:
    """Errors reach the user as one line from us; silence the libraries' own warnings and bars."""
    import huggingface_hub
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def load_model(name: str, dtype: str = "auto", device: str = "auto", attn: str = "sdpa") -> Any:
    """A supported model from a Hub id or a local folder, on ``device`` in ``dtype``."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise LoadError(
            f"cannot load {name!r}: not a local model folder, and the Hub could not be reached or has "
            f"no such model ({type(exc).__name__})"
        ) from exc
    architectures = getattr(config, "architectures", None) or []
    supported = [a for a in architectures if a in SUPPORTED_MODELS]
    if not supported:
        raise LoadError(
            f"{name!r} is a {', '.join(architectures) or config.model_type} checkpoint; supported classes "
            f"are {', '.join(SUPPORTED_MODELS)}"
        )
    if dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: allowed are {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cls = getattr(transformers, supported[0])
    model = cls.from_pretrained(name, dtype=DTYPES[dtype], attn_implementation=attn)
    return model.to(device).eval()


@dataclass
class PromptBuilder:
    """Turns (image, question) into model inputs with the checkpoint's own chat format."""

    processor: Any = None
    tokenizer: Any = None
    image_processor: Any = None

    @classmethod
    def from_pretrained(cls, name: str, model: Any) -> PromptBuilder:
        import transformers

        try:
            processor = transformers.AutoProcessor.from_pretrained(name)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                return cls(processor=processor, tokenizer=processor.tokenizer)
        except (OSError, ValueError, ImportError, AttributeError, TypeError):
            if "Qwen" not in type(model).__name__:
                raise
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        image_processor = transformers.AutoImageProcessor.from_pretrained(name)
        return cls(tokenizer=tokenizer, image_processor=image_processor)

    def __call__(self, image: Image.Image, prompt: str, model: Any) -> dict[str, torch.Tensor]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if self.processor is not None:
            template_owner = self.processor if self.processor.chat_template else self.tokenizer
            text = self._template(template_owner, messages, prompt)
            inputs = self.processor(images=image, text=text, return_tensors="pt")
        else:
            inputs = self._qwen_inputs(image, self._template(self.tokenizer, messages, prompt), model)
        return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    @staticmethod
    def _template(owner: Any, messages: list, prompt: str) -> str:
        if getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5's format

    def _qwen_inputs(self, image: Image.Image, text: str, model: Any) -> dict[str, torch.Tensor]:
        vision = self.image_processor(images=[image], return_tensors="pt")
        merge = self.image_processor.merge_size
        n_tokens = int(vision["image_grid_thw"][0].prod()) // (merge * merge)
        pad = self.tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        if pad not in text:
            raise LoadError(f"the chat template did not place an image token {pad!r} in the prompt")
        encoded = self.tokenizer(text.replace(pad, pad * n_tokens, 1), return_tensors="pt")
        mm_types = (encoded["input_ids"] == model.config.image_token_id).to(torch.int)
        return {**encoded, **vision, "mm_token_type_ids": mm_types}

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
