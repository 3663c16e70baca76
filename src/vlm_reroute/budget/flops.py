"""Budget accounting for visual-token schedules: avg_T, theoretical FLOPs and KV-cache bytes.

Pure Python (no torch / transformers import), so a CLI can load it instantly.

Conventions (see ``docs/budgets.md``):

* A schedule is ``layers`` (sorted decision layers, empty for vanilla) and ``keep`` (visual tokens
  kept **per image** in each stage). Layers before the first decision carry all ``n_visual`` tokens;
  decision layer ``layers[i]`` and the layers up to ``layers[i + 1] - 1`` carry ``keep[i]``.
  Prune and reroute have identical per-layer counts; ``reroute`` only changes the scoring overhead.
  A decision at layer 0 is an *entry*: the tokens that enter the language model at all (a method
  that reduces before it, Nüwa's stage 1); it costs no scoring in the decoder (its vision-side cost
  is in :mod:`vlm_reroute.budget.stage1`), and the decisions after it choose among those tokens.
* FLOPs are counted as **multiply-accumulates** (a matmul ``a×b · b×c`` counts ``a·b·c``), like the
  FastV and PyramidDrop papers; strict FLOPs are twice these numbers. Decoder layers only: no
  embeddings, norms, rotary, LM head or vision encoder. Attention counts the full ``n²`` score
  matrix (no causal halving), as the papers do.
* ``n`` (tokens entering a layer) counts **text + visual** tokens, unless ``count_text=False``
  (the papers' own convention: image tokens only).
* ``withdraw_at=K`` (VTW, arXiv 2405.05803): no visual token enters layers ``K..L-1``; a keyword of
  every function here, checked like the schedule (after the last decision, before the last layer).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .schedule import Keep, Schedule, check_withdraw
from .shapes import ModelShape, ShippedModel, known_models, kv_bytes_per_token, load_model_info, load_shape

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
    "validate_schedule",
    "visual_tokens_per_layer",
]

FLOPS_CONVENTIONS = ("fastv", "pdrop", "exact")

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
    num_layers: int,
    n_visual: int,
    layers: Sequence[int],
    keep: Sequence[Keep],
    reroute: bool = False,
    withdraw_at: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check a schedule with :class:`~vlm_reroute.budget.schedule.Schedule`'s rules; return the
    layers and the keep counts resolved for one image of ``n_visual`` tokens (empty for vanilla)."""
    n_visual = _as_int(n_visual, "n_visual")
    if n_visual < 0:
        raise ValueError(f"n_visual={n_visual} must be ≥ 0 (visual tokens per image)")
    if not layers and not keep:
        check_withdraw("schedule", withdraw_at, (), num_layers)
        return (), ()
    schedule = Schedule.from_budget_form(layers, keep, reroute, owner="schedule", withdraw_at=withdraw_at)
    schedule.check_depth(num_layers)
    return schedule.budget_form(n_visual)


def visual_tokens_per_layer(
    num_layers: int,
    n_visual: int,
    layers: Sequence[int],
    counts: Sequence[int],
    withdraw_at: int | None = None,
) -> list[int]:
    """Visual tokens (per image) entering each of the ``num_layers`` layers, for resolved ``counts``
    (none from ``withdraw_at`` on)."""
    per_layer = [n_visual] * num_layers
    bounds = [*layers, num_layers]
    for i, k in enumerate(counts):
        per_layer[bounds[i] : bounds[i + 1]] = [k] * (bounds[i + 1] - bounds[i])
    if withdraw_at is not None:
        per_layer[withdraw_at:] = [0] * (num_layers - withdraw_at)
    return per_layer


def avg_visual_tokens(
    num_layers: int,
    n_visual: int,
    layers: Sequence[int],
    keep: Sequence[int],
    withdraw_at: int | None = None,
) -> float:
    """avg_T: mean over all ``num_layers`` decoder layers of the visual tokens (per image) entering each."""
    layers, keep = validate_schedule(num_layers, n_visual, layers, keep, True, withdraw_at)
    return sum(visual_tokens_per_layer(num_layers, n_visual, layers, keep, withdraw_at)) / num_layers


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
    withdraw_at: int | None = None,
) -> int:
    """Prefill MACs summed over the decoder layers.

    ``n`` per layer = ``n_text`` + visual tokens of all images entering the layer; with
    ``count_text=False`` the text is ignored (the papers' convention: image tokens only).
    """
    layers, keep = validate_schedule(shape.num_layers, n_visual, layers, keep, True, withdraw_at)
    text = n_text if count_text else 0
    return sum(
        layer_flops(shape, text + num_images * v, convention)
        for v in visual_tokens_per_layer(shape.num_layers, n_visual, layers, keep, withdraw_at)
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
    withdraw_at: int | None = None

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
    withdraw_at: int | None = None,
) -> Budget:
    """Budget of a schedule for ``n_text`` text tokens plus ``num_images`` images of ``n_visual`` tokens.

    ``layers`` / ``keep`` as in the module docstring (``keep`` per image). Under prune (``reroute=False``)
    counts must be non-increasing. ``withdraw_at``: no visual tokens from that layer on (VTW; it costs
    no scoring).
    """
    layers, keep = validate_schedule(shape.num_layers, n_visual, layers, keep, reroute, withdraw_at)
    n_text = _as_int(n_text, "n_text")
    num_images = _as_int(num_images, "num_images")
    if n_text < 0:
        raise ValueError(f"n_text={n_text} must be ≥ 0")
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be ≥ 1")
    per_token_layer = 2 * shape.num_kv_heads * shape.head_dim * shape.dtype_bytes
    counts = visual_tokens_per_layer(shape.num_layers, n_visual, layers, keep, withdraw_at)
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
    entry = 1 if len(layers) > 1 and layers[0] == 0 else 0  # layer 0: an entry, scored on the vision side
    for i in range(entry, len(layers)):
        pool = keep[0] if entry else n_visual  # what a reroute decision chooses from
        if not reroute and i > entry:
            pool = keep[i - 1]
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
        withdraw_at=withdraw_at,
    )
