"""Model shapes: the decoder numbers budgets need, from a config or a shipped name.

Pure Python (no torch / transformers import): the ``budget`` command must answer instantly.
Shipped shapes (``model_configs/*.json``) make budgets work offline for the models users reach
for; any local ``config.json`` (or a Hugging Face config object) works too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ModelShape",
    "ShippedModel",
    "known_models",
    "kv_bytes_per_token",
    "load_model_info",
    "load_shape",
]

_DTYPE_BYTES = {
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
}


# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The decoder dimensions that the budget arithmetic needs."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    gated_ffn: bool = True

    def __post_init__(self) -> None:
        for field in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape({self.name!r}): {field}={value!r} must be an int ≥ 1")
        if self.dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(
                f"ModelShape({self.name!r}): dtype_bytes={self.dtype_bytes!r}; allowed: 1, 2, 4, 8"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape({self.name!r}): num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None, gated_ffn: bool = True) -> ModelShape:
        """Build from a Hugging Face config object, a config dict, or a path to ``config.json`` / its dir.

        The decoder is read from ``text_config`` when it holds the decoder fields (LLaVA; Qwen2-VL /
        Qwen2.5-VL in transformers 5), else from the top level (older Qwen json files, plain LLMs).
        ``head_dim`` defaults to ``hidden_size // num_attention_heads``, ``num_key_value_heads`` to
        ``num_attention_heads``, the dtype (``dtype`` / ``torch_dtype``) to 2 bytes. ``gated_ffn``
        (three-matrix SwiGLU MLP) is True for every LLaMA / Qwen decoder; pass False otherwise.
        """
        source = None
        if isinstance(cfg, str | os.PathLike):
            source = Path(cfg)
            cfg = _read_config_json(source)
        top = _as_dict(cfg)
        text = top.get("text_config")
        text = _as_dict(text) if text is not None else None
        dec = text if text is not None and text.get("num_hidden_layers") is not None else top

        def need(key: str) -> int:
            value = dec.get(key)
            if value is None:
                raise ValueError(
                    f"config has no {key!r} (looked in {'text_config' if dec is text else 'top level'})"
                )
            return int(value)

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = dec.get("head_dim")
        kv_heads = dec.get("num_key_value_heads")
        dtype = _first_not_none(
            dec.get("dtype"), dec.get("torch_dtype"), top.get("dtype"), top.get("torch_dtype")
        )
        if name is None:
            name = (
                top.get("_name_or_path")
                or (source.parent.name if source is not None and source.name == "config.json" else None)
                or (source.name if source is not None else None)
                or top.get("model_type")
                or "model"
            )
        return cls(
            name=str(name),
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_heads=heads,
            num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
            head_dim=int(head_dim) if head_dim is not None else hidden // heads,
            dtype_bytes=_dtype_bytes(dtype),
            gated_ffn=gated_ffn,
        )


def _first_not_none(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    raise TypeError(
        f"cannot read a model config from {type(obj).__name__}: give a config object, dict or path"
    )


def _dtype_bytes(dtype: Any) -> int:
    if dtype is None:
        return 2
    text = str(dtype).lower().removeprefix("torch.")
    if text == "auto":
        return 2
    if text not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {sorted(set(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[text]


def _read_config_json(path: Path) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no config.json at {str(path)!r}")
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


@dataclass(frozen=True)
class ShippedModel:
    """A model shape shipped with the package, plus what the tier tables assume about it."""

    shape: ModelShape
    hub_id: str
    default_visual_tokens: int
    visual_tokens_note: str


_SHIPPED_DIR = (
    Path(__file__).resolve().parent / "model_configs"
)  # not importlib.resources: that imports the package


def known_models() -> tuple[str, ...]:
    """Names of the shipped model shapes."""
    return tuple(
        sorted(p.name.removesuffix(".json") for p in _SHIPPED_DIR.iterdir() if p.name.endswith(".json"))
    )


def load_model_info(name: str) -> ShippedModel:
    """The shipped entry ``name`` (shape, hub id, default visual tokens per image)."""
    names = known_models()
    if name not in names:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names)}")
    data = json.loads((_SHIPPED_DIR / f"{name}.json").read_text(encoding="utf-8"))
    shape = ModelShape(
        name=name,
        num_layers=data["num_layers"],
        hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"],
        num_heads=data["num_heads"],
        num_kv_heads=data["num_kv_heads"],
        head_dim=data["head_dim"],
        dtype_bytes=_dtype_bytes(data["dtype"]),
        gated_ffn=data["gated_ffn"],
    )
    return ShippedModel(shape, data["hub_id"], data["default_visual_tokens"], data["visual_tokens_note"])


def load_shape(name_or_path: str | os.PathLike[str]) -> ModelShape:
    """A shipped shape by name (see :func:`known_models`), or a local model dir / ``config.json``."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in known_models():
        return load_model_info(name_or_path).shape
    path = Path(text)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return ModelShape.from_config(path)
    raise ValueError(
        f"unknown model {text!r}: not a shipped name nor a local config.json / model dir; "
        f"known models: {', '.join(known_models())}"
    )


def kv_bytes_per_token(shape: ModelShape) -> int:
    """KV-cache bytes one token costs when cached in every layer: ``2·L·kv_heads·head_dim·dtype_bytes``."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * shape.dtype_bytes
