"""Vision taps of the multi-view families: per view salience and keys, put in language-model token order.

VisionZip (arXiv 2412.04467) and Nüwa (arXiv 2602.02951) read a **salience** and **keys** per token
from the vision tower (``vision.py`` explains the contract). The multi-view families encode every
view of an image (LLaVA-NeXT's base image and anyres crops, Idefics3's tiles and global image) as
one tower batch entry, then map the views' tokens to the language model's order by the family's own
code. A tap here reads the signals **per view** in the tower, then maps them exactly as the family
maps its features:

- :class:`AnyresTap` (LLaVA-NeXT, LLaVA-OneVision): the family's ``pack_image_features`` (crop
  stitching, ``unpad_image``, OneVision's bilinear shrink, one ``image_newline`` per row) is run on
  the salience and the keys **as if they were features**, so each packed token gets the signals of
  the patch (or, where OneVision interpolates, the same bilinear mix of patches) its feature comes
  from. The newline tokens get salience 0 and zero keys and are reported as ``extras``: they carry
  no image content (one learned vector), so a method never picks or merges them.

Salience per view: the [CLS] row of the feature-layer block summed over heads when the tower has a
[CLS] token (CLIP with the ``"default"`` feature strategy: LLaVA-NeXT), else the substitute of
``methods.md`` §4 (vLLM PR 38888): the attention each patch *receives* in block −2, summed over
queries and heads within its own view, by query tiles (never an N×N buffer). Keys: the same block's
keys averaged over heads. A view's signals never mix with another view's.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import by_name
from .vision import Rewrite, TowerSignals, cls_row, column_sums

__all__ = [
    "AnyresTap",
    "MethodOverride",
    "Read",
    "SimilarityReader",
    "ViewReader",
    "ViewSignals",
    "clip_cls",
    "received_rows",
]

CLS, RECEIVED = "cls", "received"


def received_rows(
    layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None = None, max_elements: int = 1 << 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention each patch receives (V, N), keys averaged over heads (V, N, h))`` of a pre-norm
    encoder ``layer`` (``layer_norm1``, ``self_attn.q_proj/k_proj``: SigLIP, Idefics3's and SmolVLM's
    towers) whose input is ``hidden`` ``(V, N, D)``: one softmax per view, summed over its queries and
    heads (``column_sums`` by query tiles). ``mask``: the block's attention mask (None, or 4-D bool /
    additive from a padding mask): padded patches are no keys and their queries are not counted."""
    modules = by_name(layer)
    attn = modules.self_attn
    views, tokens, _ = hidden.shape
    valid = None
    if mask is not None:  # a padding mask masks keys alike in every query row
        allowed = mask if mask.dtype == torch.bool else mask == 0
        if allowed.ndim == 2:  # (V, N): flash attention's padding mask
            valid = allowed.flatten()
        else:  # (V, 1, N, N): sdpa's bool or eager's additive mask
            valid = allowed.expand(views, -1, tokens, tokens)[:, 0].any(dim=1).flatten()
    with torch.no_grad():
        normed = modules.layer_norm1(hidden)
        q = attn.q_proj(normed).view(views * tokens, attn.num_heads, attn.head_dim).float()
        k = attn.k_proj(normed).view(views * tokens, attn.num_heads, attn.head_dim).float()
        bounds = list(range(0, views * tokens + 1, tokens))
        received = column_sums(q * attn.scale, k, bounds, max_elements, valid)
    return received.view(views, tokens), k.view(views, tokens, attn.num_heads, -1).mean(dim=2)


Read = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def clip_cls(
    layer: nn.Module, hidden: torch.Tensor, _mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.vision.cls_row` as a :data:`Read` (CLIP towers have no padding mask)."""
    return cls_row(layer, hidden)


class ViewReader:
    """Reads one block's salience and keys for every view the tower encodes (pre-hook on the block):
    ``read(block, its input (V, N, D), its attention mask)`` → ``(salience (V, N'), keys (V, N', h))``."""

    def __init__(self, block: nn.Module, read: Read) -> None:
        self.block, self.read = block, read
        self.local = threading.local()

    def install(self) -> RemovableHandle:
        store = self.local

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            store.signals = self.read(module, hidden, mask)

        return self.block.register_forward_pre_hook(hook, with_kwargs=True)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last encoding's ``(salience (V, N), keys (V, N, h))``, forgotten once taken."""
        signals = getattr(self.local, "signals", None)
        if signals is None:
            raise RuntimeError("the vision tower's signal block did not run before its features were used")
        self.local.signals = None
        return signals


@dataclass(frozen=True)
class ViewSignals(TowerSignals):
    """:class:`~.vision.TowerSignals` of a multi-view tap, plus what Nüwa (arXiv 2602.02951) reads:
    ``similarity[i]`` ``(N_i, Ds)`` float32 (the mean of late block outputs per view, mapped to tokens
    as the features are; None unless a :class:`SimilarityReader` was attached) and ``crops[i]``, the
    views the tower encoded for image ``i`` (LLaVA-NeXT: base + local crops; ``nuwa.md`` §4 splits K₁
    by it). VisionZip ignores both."""

    similarity: list[torch.Tensor] | None = None
    crops: list[int] | None = None


def tower_layers(root: nn.Module, block: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` under ``root`` that holds ``block`` (a tower's encoder layers)."""
    for module in root.modules():
        if isinstance(module, nn.ModuleList) and any(layer is block for layer in module):
            return module
    raise ValueError(f"{type(block).__name__} is in no layer list of {type(root).__name__}")


class SimilarityReader:
    """Running float32 mean, per view, of the outputs of ``blocks`` (0-based) of a tower's ``layers``:
    Nüwa's similarity features (``nuwa.md`` §1.1: the mean of the late block outputs; never a stack
    of hidden states). ``drop_first``: the tower has a [CLS] token the family drops."""

    def __init__(self, layers: nn.ModuleList, blocks: Sequence[int], drop_first: bool) -> None:
        if not blocks or any(not 0 <= b < len(layers) for b in blocks):
            raise ValueError(f"similarity blocks {list(blocks)}: indices in [0, {len(layers) - 1}]")
        self.layers, self.blocks, self.drop_first = layers, list(blocks), drop_first
        self.local = threading.local()

    def install(self) -> list[RemovableHandle]:
        store = self.local

        def start(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            store.sum = None

        def read(index: int) -> Callable[..., None]:
            def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
                hidden = output[0] if isinstance(output, tuple) else output
                weighted = hidden.detach().float() * self.blocks.count(index)
                store.sum = weighted if store.sum is None else store.sum + weighted

            return hook

        handles = [self.layers[0].register_forward_pre_hook(start)]
        return handles + [self.layers[b].register_forward_hook(read(b)) for b in sorted(set(self.blocks))]

    def take(self) -> torch.Tensor:
        """The last encoding's ``(V, N, D)`` mean (the [CLS] row dropped when asked), forgotten once taken."""
        total = getattr(self.local, "sum", None)
        if total is None:
            raise RuntimeError(
                "the vision tower's similarity blocks did not run before its features were used"
            )
        self.local.sum = None
        mean = total / len(self.blocks)
        return (mean[:, 1:] if self.drop_first else mean).contiguous()


class MethodOverride(RemovableHandle):
    """Shadows one bound method of one *instance* (``owner.__dict__[name]``; the class is untouched)
    while a tap is installed; ``remove()`` restores the instance's own attribute table exactly.

    Used where a family maps view features to tokens in a plain method rather than a module
    (LLaVA-NeXT's ``pack_image_features``), which no module hook can see."""

    def __init__(
        self, owner: nn.Module, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        super().__init__(OrderedDict())  # an unused table: remove() below is the whole handle
        self.owner, self.name = owner, name
        self.had_own = name in owner.__dict__
        self.previous = owner.__dict__.get(name)
        owner.__dict__[name] = wrap(getattr(owner, name))

    def remove(self) -> None:
        if self.had_own:
            self.owner.__dict__[self.name] = self.previous
        else:
            self.owner.__dict__.pop(self.name, None)


class AnyresTap:
    """LLaVA-NeXT / LLaVA-OneVision: signals per crop, packed by the family's own ``pack_image_features``."""

    def __init__(self, inner: nn.Module, block: nn.Module, salience: str, side: int) -> None:
        if salience not in (CLS, RECEIVED):
            raise ValueError(f"salience {salience!r}: {CLS!r} or {RECEIVED!r}")
        self.inner, self.side, self.salience = inner, side, salience
        self.reader = ViewReader(block, clip_cls if salience == CLS else received_rows)
        self.similarity: SimilarityReader | None = None

    def read_similarity(self, blocks: Callable[[int], Sequence[int]]) -> None:
        """Also hand per-token similarity features (Nüwa): the mean of ``blocks(depth)`` outputs."""
        layers = tower_layers(self.inner, self.reader.block)
        self.similarity = SimilarityReader(layers, blocks(len(layers)), self.salience == CLS)

    def install(self, rewrite: Rewrite) -> list[RemovableHandle]:
        reader, side, similarity = self.reader, self.side, self.similarity

        def wrap(pack: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(pack)
            def packed(image_features: Any, image_sizes: Any, *args: Any, **kwargs: Any) -> Any:
                if "image_newline" not in kwargs:
                    raise ValueError("pack_image_features without image_newline= (keyword): unknown packing")
                features, lengths = pack(image_features, image_sizes, *args, **kwargs)
                salience, keys = reader.take()
                sizes = [int(f.shape[0]) for f in image_features]

                def as_features(values: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
                    views = list(values.split(sizes))
                    return pack(views, image_sizes, *args, **{**kwargs, "image_newline": newline})[0]

                one = salience.new_ones(1)
                packed_salience = as_features(salience[..., None], one * 0)
                is_newline = as_features(torch.zeros_like(salience)[..., None], one)
                packed_keys = as_features(keys, keys.new_zeros(keys.shape[-1]))
                extras = [(m[:, 0] == 1).nonzero().flatten() for m in is_newline]
                packed_similarity = None
                if similarity is not None:
                    mean = similarity.take()
                    packed_similarity = as_features(mean, mean.new_zeros(mean.shape[-1]))
                signals = ViewSignals(
                    list(features),
                    [s[:, 0] for s in packed_salience],
                    packed_keys,
                    [_anyres_views(side, len(f), e) for f, e in zip(features, extras, strict=True)],
                    extras,
                    packed_similarity,
                    sizes,
                )
                return rewrite(signals), lengths

            return packed

        handles = [reader.install(), MethodOverride(self.inner, "pack_image_features", wrap)]
        return handles + ([] if similarity is None else similarity.install())


def _anyres_views(side: int, length: int, newlines: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The base view, then (when the image has crops) the crop grid, whose rows each end in a newline."""
    rows = int(newlines.numel())
    cells = length - side * side - rows
    if cells == 0:
        return ((side, side),)
    return ((side, side), (rows, cells // rows))
