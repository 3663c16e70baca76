"""Nüwa stage 1, what the vision tower must give: salience, similarity and aggregation features.

The release (Nüwa, arXiv 2602.02951) runs every vision block with eager attention to read one
attention map. Here the vision tower runs with its own attention implementation; hooks read the
input of the one block whose attention is needed and recompute only the rows the method uses
(``nuwa.md`` §1.1, §3.1):

- LLaVA-1.5 (CLIP): the [CLS] query row of the feature-layer block, one row per image.
- Qwen2.5-VL: the attention every patch *receives* in the last block, computed per attention
  segment (image, or window if that block is windowed) in query chunks, so at most
  ``heads × chunk × segment`` float32 scores exist at a time (``max_elements``).

Similarity features are running float32 sums of block outputs, never a stack of hidden states.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from ...adapters.base import by_name
from ...budget.stage1 import MERGER_VIT, WINDOWED_VIT
from ...families import vision_families


@dataclass(frozen=True)
class VisionSignals:
    """Per image ``i``, in raster order of its token grid: ``features[i]`` ``(N_i, D)`` (what the
    anchors carry on, in the model's dtype, untouched), ``similarity[i]`` ``(N_i, Ds)`` and
    ``salience[i]`` ``(H_i, W_i)`` (both float32)."""

    features: list[torch.Tensor]
    similarity: list[torch.Tensor]
    salience: list[torch.Tensor]


def _depth_range(first: float, last: float, depth: int) -> range:
    """Nearest-integer (halves up) scaling of the release's ``first..last`` to ``depth`` blocks."""
    return range(int(first * depth + 0.5), int(last * depth + 0.5) + 1)


def clip_similarity_layers(depth: int) -> range:
    """Hidden-state indices averaged for similarity in a ``depth``-block CLIP tower.

    The release averages ``hs[16..24]`` of the 24-block CLIP ViT-L (``nuwa.md`` §1.1): from
    two-thirds of the depth to the last block, i.e. ``round(2·depth/3) .. depth`` (depth 2 → 1..2).
    """
    return _depth_range(16 / 24, 1.0, depth)


def qwen_similarity_blocks(depth: int) -> range:
    """Vision blocks (0-based) whose outputs are averaged for similarity in a ``depth``-block tower.

    The release averages blocks 7..23 of Qwen2.5-VL-7B's 32 (``nuwa.md`` §3.1): ``round(7·depth/32)
    .. round(23·depth/32)``, at most the last block (depth 1 → 0, depth 2 → 0..1, depth 4 → 1..3).
    """
    blocks = _depth_range(7 / 32, 23 / 32, depth)
    return range(blocks.start, min(blocks.stop, depth))


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    inner = getattr(tower, "vision_model", tower)
    return by_name(inner).encoder.layers


def cls_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[CLS]→patch attention of a CLIP encoder ``layer``, summed over heads: float32 ``(B, N)``.

    ``hidden`` ``(B, 1 + N, D)`` is the layer's input; the layer's own ``layer_norm1`` and Q/K
    projections give one query row per image; the softmax runs over all ``1 + N`` keys and the CLS
    column is dropped afterwards without renormalising (``nuwa.md`` §1.1 "Salience").
    """
    modules = by_name(layer)
    attn = modules.self_attn
    batch, tokens, _ = hidden.shape
    normed = modules.layer_norm1(hidden)
    q = attn.q_proj(normed[:, :1]).view(batch, attn.num_heads, attn.head_dim).float()
    k = attn.k_proj(normed).view(batch, tokens, attn.num_heads, attn.head_dim).float()
    probs = (torch.einsum("bhd,bthd->bht", q, k) * attn.scale).softmax(dim=-1)
    return probs[..., 1:].sum(dim=1)


class ClipSignalHooks:
    """Hooks on a CLIP vision ``tower`` that read Nüwa's signals while the tower runs (``nuwa.md`` §1.1).

    ``feature_layer`` indexes the tower's hidden states like ``LlavaConfig.vision_feature_layer``
    (``hs[0]`` embeddings, ``hs[k]`` output of block ``k``): its patch part is the aggregation
    feature and its block's [CLS] row the salience. ``similarity_layers`` (hidden-state indices,
    default :func:`clip_similarity_layers`) are averaged for similarity. The state of the last run
    is kept per thread and read with :meth:`take`.
    """

    def __init__(
        self, tower: nn.Module, feature_layer: int = -2, similarity_layers: Sequence[int] | None = None
    ) -> None:
        self.layers = _encoder_layers(tower)
        depth = len(self.layers)
        is_int = isinstance(feature_layer, int) and not isinstance(feature_layer, bool)
        if not is_int or feature_layer == 0 or not -depth <= feature_layer <= depth:
            raise ValueError(
                f"feature_layer={feature_layer!r}: one hidden-state index of a {depth}-block tower, in "
                f"[-{depth}, -1] or [1, {depth}] (hs[0] is the embedding output, which has no attention)"
            )
        self.feature_index = feature_layer % (depth + 1)
        sim = list(clip_similarity_layers(depth) if similarity_layers is None else similarity_layers)
        if not sim or any(not 1 <= i <= depth for i in sim):
            raise ValueError(f"similarity_layers={sim}: hidden-state indices in [1, {depth}] (block outputs)")
        self.sim = sim
        self.local = threading.local()

    def install(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the hooks; the caller removes the returned handles."""
        layers, store = self.layers, self.local

        def start(_module, _args):
            store.sum, store.features = None, None

        def read_salience(_module, args):
            store.salience = cls_attention(layers[self.feature_index - 1], args[0])

        def read_output(index: int):
            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if index == self.feature_index:
                    store.features = hidden[:, 1:]
                if index in self.sim:
                    weighted = hidden.float() * self.sim.count(index)
                    store.sum = weighted if store.sum is None else store.sum + weighted

            return hook

        handles = [layers[0].register_forward_pre_hook(start)]
        handles.append(layers[self.feature_index - 1].register_forward_pre_hook(read_salience))
        read = sorted({self.feature_index, *self.sim})
        handles += [layers[i - 1].register_forward_hook(read_output(i)) for i in read]
        return handles

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(salience (B, N), similarity (B, N, Ds), features (B, N, D))`` of the last run on this
        thread: float32, float32 and the tower's feature-layer patches untouched."""
        store = self.local
        if getattr(store, "sum", None) is None or getattr(store, "salience", None) is None:
            raise RuntimeError("the CLIP tower has not run since the Nüwa signal hooks were installed")
        return store.salience, (store.sum / len(self.sim))[:, 1:], store.features


def clip_signals(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int = -2,
    similarity_layers: Sequence[int] | None = None,
) -> VisionSignals:
    """Run a CLIP vision ``tower`` once and read Nüwa's three signals for LLaVA-1.5 (``nuwa.md`` §1.1).

    Arguments as :class:`ClipSignalHooks`.
    """
    hooks = ClipSignalHooks(tower, feature_layer, similarity_layers)
    handles = hooks.install()
    try:
        with torch.no_grad():
            tower(pixel_values.to(dtype=by_name(tower).dtype))
    finally:
        for handle in handles:
            handle.remove()
    salience, similarity, features = hooks.take()
    batch, patches = salience.shape
    return VisionSignals(
        features=list(features),
        similarity=list(similarity),
        salience=list(salience.view(batch, *square_grid(patches))),
    )


def square_grid(patches: int) -> tuple[int, int]:
    """The side × side grid of ``patches`` tokens (CLIP's patch grid is square)."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patches per image: Nüwa's CLIP path expects a square patch grid")
    return side, side


def check_llava_config(cfg: Any) -> None:
    """Refuse LLaVA settings Nüwa's CLIP path cannot read (no [CLS] row, several feature layers)."""
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: Nüwa needs the [CLS] "
            "token and a patch-only grid, i.e. LLaVA-1.5's 'default' strategy"
        )
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(
            f"vision_feature_layer={cfg.vision_feature_layer!r}: Nüwa reads one feature layer; "
            "several concatenated layers are not supported"
        )


def llava_signals(model: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> VisionSignals:
    """:func:`clip_signals` for a ``LlavaForConditionalGeneration`` with its configured feature layer."""
    llava = by_name(model)
    check_llava_config(llava.config)
    kwargs.setdefault("feature_layer", llava.config.vision_feature_layer)
    return clip_signals(llava.model.vision_tower, pixel_values, **kwargs)


def received_attention(
    block: nn.Module,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    max_elements: int = 1 << 25,
) -> torch.Tensor:
    """Attention each token receives in a Qwen2.5-VL vision ``block``: float32 ``(L,)``.

    Mean over heads of the sum over queries of the block's softmax attention, within each segment
    of ``cu_seqlens`` (the block's own: images for full attention, windows otherwise). ``hidden``
    ``(L, D)`` is the block input in the tower's window order. Queries go in chunks of at most
    ``max_elements // (heads · segment)`` rows.
    """
    modules = by_name(block)
    attn = modules.attn
    length = hidden.shape[0]
    qkv = attn.qkv(modules.norm1(hidden)).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], *position_embeddings)
    q, k = q.float() * attn.scaling, k.float()
    received = torch.zeros(attn.num_heads, length, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        keys = k[start:end]
        chunk = max(1, max_elements // (attn.num_heads * (end - start)))
        for first in range(start, end, chunk):
            probs = torch.einsum("qhd,khd->hqk", q[first : min(first + chunk, end)], keys)
            probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()  # softmax in place: one buffer
            received[:, start:end] += probs.div_(probs.sum(dim=-1, keepdim=True)).sum(dim=1)
    return received.mean(dim=0)


class QwenSignalHooks:
    """Hooks on a Qwen2.5-VL tower ``visual`` that read Nüwa's signals while it runs (``nuwa.md`` §3.1).

    Salience: :func:`received_attention` of the last block. Similarity: the running mean of the
    outputs of ``similarity_blocks`` (default :func:`qwen_similarity_blocks`). :meth:`take` turns the
    last run on this thread into per-image signals.
    """

    def __init__(
        self, visual: nn.Module, similarity_blocks: Sequence[int] | None = None, max_elements: int = 1 << 25
    ) -> None:
        self.visual = by_name(visual)  # the family's vision model: blocks, merger, merge size, windows
        depth = len(self.visual.blocks)
        sim = list(qwen_similarity_blocks(depth) if similarity_blocks is None else similarity_blocks)
        if not sim or any(not 0 <= i < depth for i in sim):
            raise ValueError(f"similarity_blocks={sim}: block indices in [0, {depth - 1}]")
        self.sim, self.max_elements = sim, max_elements
        self.local = threading.local()

    def install(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the hooks; the caller removes the returned handles."""
        blocks, store = self.visual.blocks, self.local

        def start(_module, _args):
            store.sum = None

        def read_salience(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            store.received = received_attention(
                module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"], self.max_elements
            )

        def read_output(index: int):
            def hook(_module, _args, output):
                weighted = output.float() * self.sim.count(index)
                store.sum = weighted if store.sum is None else store.sum + weighted

            return hook

        handles = [blocks[0].register_forward_pre_hook(start)]
        handles.append(blocks[-1].register_forward_pre_hook(read_salience, with_kwargs=True))
        handles += [blocks[i].register_forward_hook(read_output(i)) for i in sorted(set(self.sim))]
        return handles

    def take(self, grid_thw: torch.Tensor, features: torch.Tensor, official: bool = False) -> VisionSignals:
        """Per-image signals of the last run on this thread; ``features`` is the tower's merged output
        (``pooler_output``, raster order). ``official=True`` leaves similarity in window order."""
        store, visual = self.local, self.visual
        if getattr(store, "sum", None) is None:
            raise RuntimeError("the Qwen2.5-VL vision tower has not run since the Nüwa hooks were installed")
        with torch.no_grad():
            merged_sim = visual.merger((store.sum / len(self.sim)).to(visual.dtype))
        merge = visual.spatial_merge_size
        if getattr(visual, "window_size", None) is None:  # Qwen2-VL, Qwen3-VL, Qwen3.5: raster already
            to_raster = torch.arange(int(grid_thw.prod(dim=1).sum()) // merge**2, device=grid_thw.device)
        else:
            window_index, _ = get_vision_window_index(
                grid_thw,
                spatial_merge_size=merge,
                window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            to_raster = torch.argsort(window_index.to(grid_thw.device))
        unit = store.received.view(-1, merge * merge).mean(dim=-1)
        sizes = (grid_thw[:, 1] * grid_thw[:, 2] // (merge * merge)).tolist()
        salience = unit[to_raster].split(sizes)
        similarity = (merged_sim if official else merged_sim[to_raster]).float().split(sizes)
        grids = (grid_thw[:, 1:] // merge).tolist()
        return VisionSignals(
            features=list(features.split(sizes)),
            similarity=list(similarity),
            salience=[s.view(h, w) for s, (h, w) in zip(salience, grids, strict=True)],
        )


def check_image_grids(grid_thw: torch.Tensor) -> None:
    """Nüwa handles still images: one temporal step per image."""
    if grid_thw.ndim != 2 or bool((grid_thw[:, 0] != 1).any()):
        raise ValueError(f"grid_thw={grid_thw.tolist()}: Nüwa handles images, (1, h, w) per image")


def qwen_vision_signals(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    official: bool = False,
    similarity_blocks: Sequence[int] | None = None,
    max_elements: int = 1 << 25,
) -> VisionSignals:
    """Run a Qwen2.5-VL vision tower once and read Nüwa's signals, per image (``nuwa.md`` §3.1).

    Salience: :func:`received_attention` of the last block, averaged over the patches of each merge
    unit, in raster order of the merged grid. Similarity: the mean of the outputs of
    ``similarity_blocks`` (default :func:`qwen_similarity_blocks`) through the patch merger, in
    raster order — or, with ``official=True``, left in the tower's window order as the release does
    (its bug: the similarity then belongs to other grid cells). Features: the merged embeddings the
    language model would receive.
    """
    hooks = QwenSignalHooks(visual, similarity_blocks, max_elements)
    check_image_grids(grid_thw)
    handles = hooks.install()
    try:
        with torch.no_grad():
            out = visual(pixel_values.type(by_name(visual).dtype), grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    return hooks.take(grid_thw, out.pooler_output, official)


def qwen_signals(
    model: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs: Any
) -> VisionSignals:
    """:func:`qwen_vision_signals` for a model whose family's tower is a windowed ViT (Qwen2.5-VL)."""
    kinds = tuple(f for f in (*vision_families(WINDOWED_VIT), *vision_families(MERGER_VIT)) if f.qwen_pixels)
    name, classes = type(model).__name__, [f.model_class for f in kinds]
    if name not in classes:
        raise TypeError(f"{name}: Nüwa's Qwen stage 1 is defined for {', '.join(classes)}")
    return qwen_vision_signals(by_name(model).model.visual, pixel_values, image_grid_thw, **kwargs)
