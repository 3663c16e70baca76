"""Loading a checkpoint and its processor, and turning prompts into model inputs (images: ``images.py``).

Every problem a person can fix (a bad path, no network, a folder without weights or processor, a
device this machine lacks) raises :class:`LoadError` with one line
naming the value and what to do. Real Hub ids and local folders go through the same
``from_pretrained`` calls. A Hub id is checked first: when the Hub cannot be reached within a few
seconds and the model is not in the Hugging Face cache, the error says so at once instead of
after the libraries' retries.

For Qwen models whose full processor cannot be built (``Qwen2VLProcessor`` needs a video
processor, which needs torchvision), the inputs are assembled from the tokenizer and image
processor exactly as the processor would: chat template, one ``<|image_pad|>`` per merged patch,
``mm_token_type_ids``.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .adapters import SUPPORTED_MODELS
from .prompting import FAMILY_PROMPTS, family_inputs

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flash_attention_2")
DEVICE_TYPES = ("cpu", "cuda", "mps")
HUB_TIMEOUT_S = 3.0
_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class LoadError(ValueError):
    """A problem a person can fix (bad path, no network, unsupported model): one clear line.

    It exists so that the command line and the pipeline show what to do, not the libraries'
    tracebacks; the message names the model or file and the way out.
    """


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---- quiet libraries ---------------------------------------------------------------------------


class quiet_transformers:  # noqa: N801  (used like a function: quiet_transformers() or with ...)
    """Silence ``transformers``' and ``huggingface_hub``'s warnings and progress bars.

    Called alone it lasts for the process (the command line); as ``with quiet_transformers():`` the
    previous verbosity and progress-bar settings come back on exit.
    """

    def __init__(self) -> None:
        import huggingface_hub.utils as hub_utils
        import transformers

        logging = transformers.utils.logging
        self._saved = (
            logging.get_verbosity(),
            hub_utils.logging.get_verbosity(),
            logging.is_progress_bar_enabled(),
            hub_utils.are_progress_bars_disabled(),
        )
        logging.set_verbosity_error()
        hub_utils.logging.set_verbosity_error()
        logging.disable_progress_bar()
        hub_utils.disable_progress_bars()

    def __enter__(self) -> quiet_transformers:
        return self

    def __exit__(self, *exc: object) -> None:
        import huggingface_hub.utils as hub_utils
        import transformers

        logging = transformers.utils.logging
        verbosity, hub_verbosity, bar_on, hub_bars_off = self._saved
        logging.set_verbosity(verbosity)
        hub_utils.logging.set_verbosity(hub_verbosity)
        if bar_on:
            logging.enable_progress_bar()
        if not hub_bars_off:
            hub_utils.enable_progress_bars()


# ---- device, dtype, attention ------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise LoadError(f"device {device!r}: allowed are auto, cpu, cuda, cuda:N, mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(
                f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                "use cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LoadError(f"device {device!r}: MPS is not available on this machine; use cpu (or auto)")
    return dev


def check_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: allowed are {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_attention(attn: str, device: torch.device) -> str:
    """``sdpa`` and ``eager`` everywhere; ``flash_attention_2`` only with flash-attn and CUDA."""
    if attn not in ATTENTION:
        raise LoadError(f"attention {attn!r}: allowed are {', '.join(ATTENTION)}")
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise LoadError(
                "attention 'flash_attention_2' needs the flash-attn package, which is not installed; "
                "use sdpa (or eager)"
            )
        if device.type != "cuda":
            raise LoadError(f"attention 'flash_attention_2' runs on CUDA only, not on {device}; use sdpa")
    return attn


# ---- where a model comes from ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A local folder or a Hub id, and whether ``from_pretrained`` must stay offline.

    Decided once, quickly (:func:`resolve_source`), so that a Hub id without network fails within
    seconds instead of inside ``from_pretrained``'s retries. ``local_files_only`` holds for a local
    folder, under ``HF_HUB_OFFLINE``, and for an unreachable Hub with the model cached.
    """

    name: str
    local: bool
    local_files_only: bool


def _hub_target() -> tuple[str, int]:
    """Host and port a Hub request goes to first: the HTTPS proxy if one is set, else the endpoint."""
    from huggingface_hub import constants

    proxy = urllib.request.getproxies().get("https")
    url = urllib.parse.urlsplit(proxy or constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Can a TCP connection to the Hub (or the HTTPS proxy) be opened within ``timeout`` seconds?

    Name resolution can block longer than any socket timeout, so the attempt runs in a daemon
    thread that is abandoned when the time is up.
    """
    host, port = _hub_target()
    done: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            done.append(True)
        except OSError:
            done.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(done and done[0])


def _looks_like_path(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def resolve_source(name: str) -> ModelSource:
    """Decide, quickly, whether ``name`` is a usable local folder or a Hub id that can be fetched."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"model {name!r} is a file; give a model folder (with config.json) or a Hub id")
        if not (path / "config.json").is_file():
            raise LoadError(
                f"model folder {name!r} has no config.json; give a folder written by save_pretrained"
            )
        return ModelSource(str(path), local=True, local_files_only=True)
    if _looks_like_path(name):
        raise LoadError(
            f"no model folder at {name!r} (and it is not a Hub id such as llava-hf/llava-1.5-7b-hf)"
        )
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise LoadError(
                f"model {name!r} is neither a local folder nor in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 is set: download it once with network, or pass a local model folder"
            )
        return ModelSource(name, local=False, local_files_only=True)
    if hub_reachable():
        return ModelSource(name, local=False, local_files_only=False)
    if cached:
        return ModelSource(name, local=False, local_files_only=True)
    host, port = _hub_target()
    raise LoadError(
        f"model {name!r} is not a local folder and the Hugging Face Hub ({host}:{port}) cannot be reached "
        f"(no answer within {HUB_TIMEOUT_S:g} s): without network, pass a local model folder, or set "
        "HF_HUB_OFFLINE=1 to use models already in the Hugging Face cache"
    )


def _check_folder(path: Path, name: str) -> None:
    """A local checkpoint must hold weights, a tokenizer and an image processor."""
    if not any(any(path.glob(pattern)) for pattern in _WEIGHTS):
        raise LoadError(
            f"model folder {name!r} has a config.json but no weights (*.safetensors or *.bin); "
            "write them with model.save_pretrained(folder)"
        )
    missing = [
        what
        for what, files in (("tokenizer", _TOKENIZER_FILES), ("image processor", _IMAGE_PROCESSOR_FILES))
        if not any((path / f).is_file() for f in files)
    ]
    if missing:
        raise LoadError(
            f"model folder {name!r} has weights but no {' and no '.join(missing)}; write them beside the "
            "model with processor.save_pretrained(folder)"
        )


# ---- the model ---------------------------------------------------------------------------------


def checkpoint_class(config: Any, what: str, error: type[ValueError] = LoadError) -> Any:
    """The ``transformers`` class that loads a checkpoint of ``config``: the first of its architectures
    that vlm-reroute routes. Shared by :func:`load_model` and the lmms-eval plugin's loader
    (``eval/checkpoint.py``): ``what`` names the checkpoint as each caller's user gave it, ``error`` is
    the caller's error type."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    supported = [a for a in architectures if a in SUPPORTED_MODELS]
    if not supported:
        raise error(
            f"{what} is a {', '.join(architectures) or config.model_type} checkpoint; supported classes "
            f"are {', '.join(SUPPORTED_MODELS)}"
        )
    return getattr(transformers, supported[0])


def pretrained_kwargs(dtype: str, attn: str | None, device_map: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` keywords for a checked ``dtype`` name, an attention implementation (``None``:
    transformers' choice) and an optional ``device_map`` (sharding over devices)."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if device_map:
        kwargs["device_map"] = device_map
    return kwargs


def load_model(
    name: str,
    dtype: str = "auto",
    device: str = "auto",
    attn: str = "sdpa",
    source: ModelSource | None = None,
) -> Any:
    """A supported model from a Hub id or a local folder, on ``device`` in ``dtype``.

    ``source`` (from :func:`resolve_source`) skips a second look at the folder or the network.
    """
    import transformers

    check_dtype(dtype)
    dev = resolve_device(device)
    check_attention(attn, dev)
    source = source or resolve_source(name)
    offline = {"local_files_only": source.local_files_only}
    try:
        config = transformers.AutoConfig.from_pretrained(source.name, **offline)
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"cannot read the config of {name!r} ({_first_line(exc)})") from exc
    cls = checkpoint_class(config, repr(name))
    if source.local:
        _check_folder(Path(source.name), name)
    try:
        model = cls.from_pretrained(source.name, **pretrained_kwargs(dtype, attn), **offline)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise LoadError(f"cannot load the weights of {name!r} ({_first_line(exc)})") from exc
    return model.to(dev).eval()


# ---- prompts -----------------------------------------------------------------------------------

Sample = tuple[Sequence[Image.Image], str]


@dataclass
class PromptBuilder:
    """Turns (images, question) pairs into model inputs with the checkpoint's own chat format.

    Batches are padded on the left (generation continues every prompt from its last token). It
    exists so that the pipeline and every command build prompts one way: the processor when it can be
    built, else the tokenizer and image processor by the adapters' expansion rule
    (:mod:`vlm_reroute.prompting`).
    """

    processor: Any = None
    tokenizer: Any = None
    image_processor: Any = None

    @classmethod
    def from_pretrained(cls, name: str, model: Any, source: ModelSource | None = None) -> PromptBuilder:
        """The checkpoint's processor (or, for Qwen without torchvision, its tokenizer and image
        processor); ``source`` as for :func:`load_model`."""
        import transformers

        source = source or resolve_source(name)
        # Any: transformers 5.25 annotates from_pretrained's keywords (a dict[str, bool] fits none)
        offline: dict[str, Any] = {"local_files_only": source.local_files_only}
        folder = source.name
        try:
            processor = transformers.AutoProcessor.from_pretrained(folder, **offline)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                processor.tokenizer.padding_side = "left"
                return cls(processor=processor, tokenizer=processor.tokenizer)
        except (OSError, ValueError, ImportError, AttributeError, TypeError, KeyError) as exc:
            if type(model).__name__ not in FAMILY_PROMPTS:
                raise LoadError(f"cannot load the processor of {name!r} ({_first_line(exc)})") from exc
        try:  # Qwen without torchvision: tokenizer + image processor, assembled as the processor would
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **offline)
            image_processor = transformers.AutoImageProcessor.from_pretrained(folder, **offline)
        except (OSError, ValueError, ImportError, KeyError) as exc:
            raise LoadError(
                f"cannot load the tokenizer or image processor of {name!r} ({_first_line(exc)})"
            ) from exc
        tokenizer.padding_side = "left"
        return cls(tokenizer=tokenizer, image_processor=image_processor)

    def __call__(
        self, image: Image.Image | Sequence[Image.Image], prompt: str, model: Any
    ) -> dict[str, torch.Tensor]:
        """Inputs for one prompt about one image (or several, in order)."""
        images = [image] if isinstance(image, Image.Image) else list(image)
        return self.batch([(images, prompt)], model)

    def batch(self, samples: Sequence[Sample], model: Any) -> dict[str, torch.Tensor]:
        """Inputs for several prompts, each with its own images, padded on the left."""
        texts = [self.text(len(images), prompt) for images, prompt in samples]
        flat = [image for images, _ in samples for image in images]
        if self.processor is not None:
            inputs = self.processor(images=flat or None, text=texts, return_tensors="pt", padding=True)
        else:
            images = [list(images) for images, _ in samples]
            inputs = family_inputs(model, self.tokenizer, self.image_processor, images, texts)
        return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def text(self, num_images: int, prompt: str) -> str:
        """The prompt in the checkpoint's chat format, with one image placeholder per image."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "USER: " + "<image>\n" * num_images + f"{prompt} ASSISTANT:"  # LLaVA-1.5's format

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
