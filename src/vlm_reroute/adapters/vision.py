"""The vision-side footing of stage-1 methods: what a family's tower tells, per language-model token.

A stage-1 method (VisionZip, arXiv 2412.04467; DivPrune, arXiv 2503.02175; Nüwa, arXiv 2602.02951)
decides which visual tokens enter the language model. DivPrune needs only the rows the language
model receives, which the engine holds at decoder layer 0 for every family. VisionZip needs more
from the tower: a **salience** per token and **keys** to merge similar tokens by. Each adapter that
can read them returns a :class:`VisionTap` from :meth:`~.base.ModelAdapter.vision_tap`; the tap
hooks the tower, hands every encoding to the method as :class:`TowerSignals` (in the order the
language model receives the tokens, one entry per image) and writes the rows the method returns
back in place of the projected features. Two taps exist:

- :class:`ClipTap` (LLaVA-1.5): the [CLS] query row of the feature-layer block (VisionZip's
  ``attentions[-2][:, :, 0, 1:]``), **summed** over heads, and that block's keys averaged over heads
  (``raw_key_states.mean(1)``); the rows are the multimodal projector's output.
- :class:`MergerTap` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): the ViT has no [CLS] token, so the
  salience is the substitute of ``methods.md`` §4 ("Qwen-family notes", vLLM PR 38888): the attention
  each patch *receives* in block −2 (column sums within the block's own attention segments,
  computed by query tiles: no N×N buffer), and the keys of that block, both averaged over the
  patches each merged token holds and put in raster order; the rows are the patch merger's output.

The multi-view families (one image = several views) have taps that read these signals per view and
map them to tokens as the family maps its features: ``vision_views.AnyresTap`` (LLaVA-NeXT, OneVision:
the family's own ``pack_image_features`` run on the signals; newline tokens are ``extras``, never
picked) and ``vision_prompt.PromptTap`` (InternVL, Idefics3, SmolVLM: the pixel shuffle, views grouped
into images by the prompt). An adapter without a tap returns None; a method that needs one refuses
it with one error (:func:`require_tap`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .base import by_name, rotate_half

if TYPE_CHECKING:
    from .base import ModelAdapter

__all__ = ["ClipTap", "MergerTap", "TowerSignals", "VisionTap", "column_sums", "require_tap"]

Rewrite = Callable[["TowerSignals"], list[torch.Tensor]]


@dataclass(frozen=True)
class TowerSignals:
    """One encoding, per image ``i``: ``features[i]`` ``(N_i, D)`` the rows the language model would
    receive (model dtype, untouched), ``salience[i]`` ``(N_i,)`` and ``keys[i]`` ``(N_i, h)`` (float32),
    ``views[i]`` the rows × cols of each view of the image in token order (one view, raster order, for
    the single-view families; base view then crop grid, or tiles then thumbnail, for the multi-view
    ones: ``vision_views.py``), ``extras[i]`` the indices of its tokens that are no view cell (LLaVA-NeXT's
    ``image_newline`` rows): they carry no image content, so a method never picks or merges them."""

    features: list[torch.Tensor]
    salience: list[torch.Tensor]
    keys: list[torch.Tensor]
    views: list[tuple[tuple[int, int], ...]]
    extras: list[torch.Tensor] | None = None

    def extras_of(self, image: int) -> torch.Tensor:
        """Long indices of image ``image``'s non-cell tokens (empty for a single-view family)."""
        if self.extras is None:
            return torch.zeros(0, dtype=torch.long)
        return self.extras[image]


class VisionTap(Protocol):
    """Hooks on a tower: call ``rewrite`` with each encoding and use the rows it returns."""

    #: ``"cls"`` ([CLS] attention) or ``"received"`` (the substitute: attention received in block −2)
    salience: str

    def install(self, rewrite: Rewrite) -> list[torch.utils.hooks.RemovableHandle]: ...


def require_tap(adapter: ModelAdapter, method: str) -> VisionTap:
    """The adapter's tap, or one ValueError naming the model and the families that have one."""
    tap = adapter.vision_tap()
    if tap is None:
        raise ValueError(
            f"{method} needs a vision-side salience (a [CLS] row or attention received in the tower) that "
            f"the {type(adapter).__name__} of {type(adapter.model).__name__} does not provide (its adapter "
            "has no vision_tap); every built-in family has one (DivPrune needs none and runs on any model)"
        )
    return tap


class ClipTap:
    """A CLIP tower with a [CLS] token, its patches projected by ``projector`` (LLaVA-1.5)."""

    salience = "cls"

    def __init__(self, layers: nn.ModuleList, feature_layer: int, projector: nn.Module) -> None:
        depth = len(layers)
        if not isinstance(feature_layer, int) or feature_layer == 0 or not -depth <= feature_layer <= depth:
            raise ValueError(
                f"vision_feature_layer={feature_layer!r}: one hidden-state index of a {depth}-block tower "
                f"in [-{depth}, -1] or [1, {depth}] (a stage-1 salience reads one block)"
            )
        self.block: nn.Module = layers[feature_layer % (depth + 1) - 1]  # hs[k] is block k's output
        self.projector = projector
        self.local = threading.local()

    def install(self, rewrite: Rewrite) -> list[torch.utils.hooks.RemovableHandle]:
        store = self.local

        def read(module: nn.Module, args: tuple[Any, ...]) -> None:
            store.salience, store.keys = cls_row(module, args[0])

        def after_projector(_module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            side = int(round(output.shape[1] ** 0.5))
            signals = TowerSignals(
                list(output), list(store.salience), list(store.keys), [((side, side),)] * output.shape[0]
            )
            return torch.stack(rewrite(signals))

        return [
            self.block.register_forward_pre_hook(read),
            self.projector.register_forward_hook(after_projector),
        ]


def cls_row(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([CLS]→patch attention summed over heads (B, N), patch keys averaged over heads (B, N, h))``
    of a CLIP encoder ``layer`` whose input is ``hidden`` ``(B, 1 + N, D)``; the softmax runs over all
    ``1 + N`` keys, the CLS column is dropped afterwards (VisionZip's ``attn[:, :, 0, 1:]``)."""
    modules = by_name(layer)
    attn = modules.self_attn
    batch, tokens, _ = hidden.shape
    with torch.no_grad():
        normed = modules.layer_norm1(hidden)
        q = attn.q_proj(normed[:, :1]).view(batch, attn.num_heads, attn.head_dim).float()
        k = attn.k_proj(normed).view(batch, tokens, attn.num_heads, attn.head_dim).float()
        probs = (torch.einsum("bhd,bthd->bht", q, k) * attn.scale).softmax(dim=-1)
    return probs[..., 1:].sum(dim=1), k[:, 1:].mean(dim=2)


def column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    bounds: list[int],
    max_elements: int = 1 << 25,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each token receives ``(L,)``, summed over queries and heads, within each segment
    ``bounds[i]..bounds[i+1]`` of ``q``/``k`` ``(L, heads, h)`` (``q`` scaled): query tiles of at most
    ``max_elements // (heads · segment)`` rows, one softmax buffer at a time, never ``L × L``.

    ``valid`` ``(L,)`` bool (None: all): a tower's padding mask (Idefics3's padded patches); an invalid
    token is no key (probability 0) and its query row is not counted, as the tower's own mask does."""
    heads, length = q.shape[1], q.shape[0]
    received = torch.zeros(length, dtype=torch.float32, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):  # a loop over segments and tiles
        keys = k[start:end]
        bias = None if valid is None else torch.where(valid[start:end], 0.0, -torch.inf).to(q.device)
        tile = max(1, max_elements // (heads * (end - start)))
        for first in range(start, end, tile):
            last = min(first + tile, end)
            probs = torch.einsum("qhd,khd->hqk", q[first:last], keys)
            if bias is not None:
                probs.add_(bias)
            probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
            probs.div_(probs.sum(dim=-1, keepdim=True))
            if valid is not None:
                probs.mul_(valid[first:last].to(probs)[None, :, None])
            received[start:end] += probs.sum(dim=(0, 1))
    return received


class MergerTap:
    """A ViT without [CLS] whose patches a merger folds into tokens (Qwen2-VL to Qwen3.5): salience and
    keys from block −2, averaged over each token's ``merge²`` patches, in raster order."""

    salience = "received"

    def __init__(self, visual: nn.Module, block: int = -2, max_elements: int = 1 << 25) -> None:
        self.visual = by_name(visual)  # the family's vision model: blocks, merge size, windows
        blocks = self.visual.blocks
        self.block: nn.Module = blocks[max(block, -len(blocks))]  # a one-block tower: its only block
        self.max_elements = max_elements
        self.local = threading.local()

    def install(self, rewrite: Rewrite) -> list[torch.utils.hooks.RemovableHandle]:
        store, visual = self.local, self.visual

        def read(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            store.received, store.keys = self._signals(module, hidden, kwargs)

        def after_tower(
            _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            if grid_thw.ndim != 2 or bool((grid_thw[:, 0] != 1).any()):
                raise ValueError(f"grid_thw={grid_thw.tolist()}: a stage-1 method handles images, (1, h, w)")
            merge = visual.spatial_merge_size
            order = self._raster(grid_thw)
            unit = merge * merge
            salience = store.received.view(-1, unit).mean(dim=-1)[order]
            keys = store.keys.view(-1, unit, store.keys.shape[-1]).mean(dim=1)[order]
            sizes = (grid_thw[:, 1] * grid_thw[:, 2] // unit).tolist()
            grids: list[tuple[tuple[int, int], ...]] = [
                ((h // merge, w // merge),) for h, w in grid_thw[:, 1:].tolist()
            ]
            features = output.pooler_output
            signals = TowerSignals(
                list(features.split(sizes)), list(salience.split(sizes)), list(keys.split(sizes)), grids
            )
            output.pooler_output = torch.cat(rewrite(signals))
            return output

        return [
            self.block.register_forward_pre_hook(read, with_kwargs=True),
            visual.register_forward_hook(after_tower, with_kwargs=True),
        ]

    def _signals(
        self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        modules = by_name(block)
        attn = modules.attn
        length = hidden.shape[0]
        with torch.no_grad():
            qkv = attn.qkv(modules.norm1(hidden)).reshape(length, 3, attn.num_heads, -1).float()
            q, k = qkv[:, 0], qkv[:, 1]
            cos, sin = (t.unsqueeze(-2).float() for t in kwargs["position_embeddings"])
            q_rot = (q * cos + rotate_half(q) * sin) * attn.scaling
            k_rot = k * cos + rotate_half(k) * sin
            received = column_sums(q_rot, k_rot, kwargs["cu_seqlens"].tolist(), self.max_elements)
        return received, k.mean(dim=1)

    def _raster(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Token order of the tower's output → raster order (Qwen2.5-VL's windows; else identity)."""
        visual = self.visual
        tokens = int((grid_thw.prod(dim=1) // visual.spatial_merge_size**2).sum())
        if getattr(visual, "window_size", None) is None:
            return torch.arange(tokens, device=grid_thw.device)
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return torch.argsort(window_index.to(grid_thw.device))
