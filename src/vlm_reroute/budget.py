"""Budget accounting for visual-token schedules: avg_T, theoretical FLOPs and KV-cache bytes.

Pure Python (no torch / transformers import), so a CLI can load it instantly.

Conventions (see ``docs/budgets.md``):

* A schedule is ``layers`` (sorted decision layers, empty for vanilla) and ``keep`` (visual tokens
  kept **per image** in each stage). Layers before the first decision carry all ``n_visual`` tokens;
  decision layer ``layers[i]`` and the layers up to ``layers[i + 1] - 1`` carry ``keep[i]``.
  Prune and reroute have identical per-layer counts; ``reroute`` only changes the scoring overhead.
* FLOPs are counted as **multiply-accumulates** (a matmul ``a×b · b×c`` counts ``a·b·c``), like the
  FastV and PyramidDrop papers; strict FLOPs are twice these numbers. Decoder layers only: no
  embeddings, norms, rotary, LM head or vision encoder. Attention counts the full ``n²`` score
  matrix (no causal halving), as the papers do.
* ``n`` (tokens entering a layer) counts **text + visual** tokens, unless ``count_text=False``
  (the papers' own convention: image tokens only).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

__all__ = [
    "Budget",
    "LayerBudget",
    "ModelShape",
    "ShippedModel",
    "avg_visual_tokens",
    "compute_budget",
    "flops",
    "known_models",
    "kv_bytes_per_token",
    "layer_flops",
    "load_model_info",
    "load_shape",
    "stage_counts",
    "validate_schedule",
]

FLOPS_CONVENTIONS = ("fastv", "pdrop", "exact")

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


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what}={value!r} must be an int, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what}={value!r} must be an int (a token count / layer index)") from None


def validate_schedule(
    num_layers: int, n_visual: int, layers: Sequence[int], keep: Sequence[int], reroute: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check a schedule; return it as int tuples. ``ValueError`` names the bad value and what is allowed."""
    n_visual = _as_int(n_visual, "n_visual")
    if n_visual < 0:
        raise ValueError(f"n_visual={n_visual} must be ≥ 0")
    layers = tuple(_as_int(x, "layers entry") for x in layers)
    keep = tuple(_as_int(x, "keep entry") for x in keep)
    if len(keep) != len(layers):
        raise ValueError(
            f"len(keep)={len(keep)} != len(layers)={len(layers)}: one keep count per decision layer "
            f"(layers={list(layers)}, keep={list(keep)})"
        )
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"decision layer {layer} is out of range: the decoder has {num_layers} layers, "
                f"allowed 0..{num_layers - 1}"
            )
    for a, b in pairwise(layers):
        if b <= a:
            raise ValueError(
                f"layers={list(layers)} must be strictly increasing (sorted, no repeats): {a} then {b}"
            )
    for k in keep:
        if not 1 <= k <= n_visual:
            raise ValueError(
                f"keep count {k} is out of range: allowed 1..n_visual={n_visual} (keep={list(keep)})"
            )
    if not reroute:
        for a, b in pairwise(keep):
            if b > a:
                raise ValueError(
                    f"keep={list(keep)} increases ({a} then {b}); with reroute=False (prune) pruned tokens "
                    "cannot come back, so counts must be non-increasing"
                )
    return layers, keep


def stage_counts(num_layers: int, n_visual: int, layers: Sequence[int], keep: Sequence[int]) -> list[int]:
    """Visual tokens (per image) entering each of the ``num_layers`` layers. No validation."""
    counts = [n_visual] * num_layers
    bounds = list(layers) + [num_layers]
    for i, k in enumerate(keep):
        for j in range(bounds[i], bounds[i + 1]):
            counts[j] = k
    return counts


def avg_visual_tokens(num_layers: int, n_visual: int, layers: Sequence[int], keep: Sequence[int]) -> float:
    """avg_T: mean over all ``num_layers`` decoder layers of the visual tokens (per image) entering each."""
    layers, keep = validate_schedule(num_layers, n_visual, layers, keep, reroute=True)
    return sum(stage_counts(num_layers, n_visual, layers, keep)) / num_layers


# --------------------------------------------------------------------------------------------
# FLOPs (multiply-accumulates) and KV bytes
# --------------------------------------------------------------------------------------------


def layer_flops(shape: ModelShape, n: int, convention: str = "pdrop") -> int:
    """MACs of one decoder layer on ``n`` tokens.

    * ``"fastv"``: ``4nd² + 2n²d + 2ndm`` (FastV Eq. 5: QKVO, QKᵀ and AV, two-matrix FFN).
    * ``"pdrop"``: ``4nd² + 2n²d + 3ndm`` (PyramidDrop: three-matrix SwiGLU FFN).
    * ``"exact"``: GQA-aware: Q and O ``n·d·(heads·head_dim)`` each, K and V ``n·d·(kv_heads·head_dim)``
      each, scores and values ``2n²·heads·head_dim`` (full ``n²``), FFN ``3ndm`` if gated else ``2ndm``.
    """
    d, m = shape.hidden_size, shape.intermediate_size
    if convention == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if convention == "pdrop":
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    if convention == "exact":
        q_width = shape.num_heads * shape.head_dim
        kv_width = shape.num_kv_heads * shape.head_dim
        ffn = (3 if shape.gated_ffn else 2) * n * d * m
        return 2 * n * d * q_width + 2 * n * d * kv_width + 2 * n * n * q_width + ffn
    raise ValueError(f"unknown FLOPs convention {convention!r}; allowed: {', '.join(FLOPS_CONVENTIONS)}")


def flops(
    shape: ModelShape,
    n_visual: int,
    n_text: int = 0,
    layers: Sequence[int] = (),
    keep: Sequence[int] = (),
    convention: str = "pdrop",
    count_text: bool = True,
    num_images: int = 1,
) -> int:
    """Prefill MACs summed over the decoder layers.

    ``n`` per layer = ``n_text`` + visual tokens of all images entering the layer; with
    ``count_text=False`` the text is ignored (the papers' convention: image tokens only).
    """
    layers, keep = validate_schedule(shape.num_layers, n_visual, layers, keep, reroute=True)
    text = n_text if count_text else 0
    return sum(
        layer_flops(shape, text + num_images * v, convention)
        for v in stage_counts(shape.num_layers, n_visual, layers, keep)
    )


def _scoring_flops(shape: ModelShape, n_keys: int) -> int:
    """MACs of one decision's scoring: one query row, keys for ``n_keys`` positions, one score row."""
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    return shape.hidden_size * q_width + n_keys * shape.hidden_size * kv_width + n_keys * q_width


@dataclass(frozen=True)
class LayerBudget:
    """One decoder layer. ``visual_tokens`` sums all images; FLOPs are MACs with ``n`` = text + visual."""

    layer: int
    visual_tokens: int
    text_tokens: int
    flops_fastv: int
    flops_pdrop: int
    flops_exact: int
    kv_tokens: int
    kv_bytes: int


@dataclass(frozen=True)
class Budget:
    """Per-layer rows and totals of one schedule, with vanilla (no decision) totals for ratios.

    FLOPs are multiply-accumulates over the decoder layers with ``n`` = text + visual tokens entering
    each layer. ``flops_scoring`` (the router's own q·k rows, not included in the three conventions)
    is the extra cost of the decisions; under reroute each decision scores every visual token.
    ``avg_visual_tokens`` (avg_T) is per image; ``kv_tokens`` is Σ over layers of cached tokens.
    """

    shape: ModelShape
    n_visual: int
    n_text: int
    num_images: int
    layers: tuple[int, ...]
    keep: tuple[int, ...]
    reroute: bool
    rows: tuple[LayerBudget, ...]
    flops_fastv: int
    flops_pdrop: int
    flops_exact: int
    flops_scoring: int
    kv_tokens: int
    kv_bytes: int
    avg_visual_tokens: float
    vanilla_flops_fastv: int
    vanilla_flops_pdrop: int
    vanilla_flops_exact: int
    vanilla_kv_bytes: int

    @property
    def avg_t(self) -> float:
        """Alias of ``avg_visual_tokens``."""
        return self.avg_visual_tokens

    @property
    def token_reduction(self) -> float:
        """``1 - avg_T / n_visual`` (0 for a text-only prompt)."""
        return 1.0 - self.avg_visual_tokens / self.n_visual if self.n_visual else 0.0

    @property
    def flops_fastv_ratio(self) -> float:
        return _ratio(self.flops_fastv, self.vanilla_flops_fastv)

    @property
    def flops_pdrop_ratio(self) -> float:
        return _ratio(self.flops_pdrop, self.vanilla_flops_pdrop)

    @property
    def flops_exact_ratio(self) -> float:
        return _ratio(self.flops_exact, self.vanilla_flops_exact)

    @property
    def kv_bytes_ratio(self) -> float:
        return _ratio(self.kv_bytes, self.vanilla_kv_bytes)

    def to_dict(self, rows: bool = True) -> dict[str, Any]:
        """Plain data (JSON-ready), ratios included; ``rows=False`` drops the per-layer rows."""
        out = asdict(self)
        if not rows:
            del out["rows"]
        out["layers"], out["keep"] = list(self.layers), list(self.keep)
        for name in (
            "token_reduction",
            "flops_fastv_ratio",
            "flops_pdrop_ratio",
            "flops_exact_ratio",
            "kv_bytes_ratio",
        ):
            out[name] = getattr(self, name)
        return out


def _ratio(a: int, b: int) -> float:
    return a / b if b else 1.0


def compute_budget(
    shape: ModelShape,
    n_visual: int,
    n_text: int,
    layers: Sequence[int] = (),
    keep: Sequence[int] = (),
    reroute: bool = False,
    *,
    num_images: int = 1,
) -> Budget:
    """Budget of a schedule for ``n_text`` text tokens plus ``num_images`` images of ``n_visual`` tokens.

    ``layers`` / ``keep`` as in the module docstring (``keep`` per image). Under prune (``reroute=False``)
    counts must be non-increasing.
    """
    layers, keep = validate_schedule(shape.num_layers, n_visual, layers, keep, reroute)
    n_text = _as_int(n_text, "n_text")
    num_images = _as_int(num_images, "num_images")
    if n_text < 0:
        raise ValueError(f"n_text={n_text} must be ≥ 0")
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be ≥ 1")
    per_token_layer = 2 * shape.num_kv_heads * shape.head_dim * shape.dtype_bytes
    counts = stage_counts(shape.num_layers, n_visual, layers, keep)
    rows = []
    for j, v in enumerate(counts):
        n = n_text + num_images * v
        rows.append(
            LayerBudget(
                layer=j,
                visual_tokens=num_images * v,
                text_tokens=n_text,
                flops_fastv=layer_flops(shape, n, "fastv"),
                flops_pdrop=layer_flops(shape, n, "pdrop"),
                flops_exact=layer_flops(shape, n, "exact"),
                kv_tokens=n,
                kv_bytes=n * per_token_layer,
            )
        )
    scoring = 0
    for i in range(len(layers)):
        pool = n_visual if (reroute or i == 0) else keep[i - 1]
        scoring += _scoring_flops(shape, n_text + num_images * pool)
    vanilla_n = n_text + num_images * n_visual
    nl = shape.num_layers
    return Budget(
        shape=shape,
        n_visual=n_visual,
        n_text=n_text,
        num_images=num_images,
        layers=layers,
        keep=keep,
        reroute=bool(reroute),
        rows=tuple(rows),
        flops_fastv=sum(r.flops_fastv for r in rows),
        flops_pdrop=sum(r.flops_pdrop for r in rows),
        flops_exact=sum(r.flops_exact for r in rows),
        flops_scoring=scoring,
        kv_tokens=sum(r.kv_tokens for r in rows),
        kv_bytes=sum(r.kv_bytes for r in rows),
        avg_visual_tokens=sum(counts) / nl,
        vanilla_flops_fastv=nl * layer_flops(shape, vanilla_n, "fastv"),
        vanilla_flops_pdrop=nl * layer_flops(shape, vanilla_n, "pdrop"),
        vanilla_flops_exact=nl * layer_flops(shape, vanilla_n, "exact"),
        vanilla_kv_bytes=nl * vanilla_n * per_token_layer,
    )
