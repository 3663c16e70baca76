"""Vision taps for towers that see views but not images: InternVL's tiles, Idefics3's and SmolVLM's tiles.

InternVL (``get_image_features``: every tile of every image of the batch in one ``(V, T, D)`` tensor)
and Idefics3 / SmolVLM (one list entry per prompt) encode **views**; which views make one image is
written only in the prompt (InternVL: one run of ``T · tiles`` ``<IMG_CONTEXT>`` tokens per image;
Idefics3: the ``<global-img>`` tag closes an image). VisionZip (arXiv 2412.04467) works per image, so
:class:`PromptTap` groups the views by the prompt the adapter reads (``tokens_per_image``):

- in a forward call that carries ``pixel_values``, a pre-hook on the model reads ``input_ids`` first,
  and the encoding (``get_image_features``, shadowed on the instance) rewrites at once;
- ``generate()`` encodes the images *before* its first forward (``mm_encoder_outputs``): the encoding
  is left untouched and its signals kept; the prefill's pre-hook, which sees the prompt, rewrites the
  very output object ``generate()`` passes (its ``pooler_output``), before any decoder layer runs.

Per view, the signals are read in the tower (``vision_views.ViewReader``) and mapped to tokens by the
family's own pixel shuffle run on them as if they were features (``to_tokens``): each token gets the
mean over the ``s²`` patches it holds (as the Qwen merger tap averages over ``merge²``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import by_name
from .vision import Rewrite
from .vision_views import MethodOverride, SimilarityReader, ViewReader, ViewSignals, tower_layers

__all__ = ["PromptTap", "ToTokens", "shuffled_mean"]

#: ``(salience (V, P), keys (V, P, h))`` per patch → the same per token ``((V, T), (V, T, h))``
ToTokens = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def shuffled_mean(
    values: torch.Tensor, shuffle: Callable[[torch.Tensor], torch.Tensor], unit: int
) -> torch.Tensor:
    """``values`` ``(V, P, c)`` through a family's pixel ``shuffle`` (``(V, T, unit · c)``, each token's
    ``unit`` patches side by side, ``c`` innermost), averaged over those patches: ``(V, T, c)``."""
    out = shuffle(values)
    return out.reshape(out.shape[0], -1, unit, values.shape[-1]).mean(dim=2)


class PromptTap:
    """Signals per view, grouped into images as the prompt says (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        inner: nn.Module,
        reader: ViewReader,
        to_tokens: ToTokens,
        side: int,
        tokens_per_image: Callable[[torch.Tensor], list[int]],
        salience: str,
    ) -> None:
        self.salience = salience  # "cls" or "received" (``vision.VisionTap``)
        self.model, self.inner, self.reader = model, inner, reader
        self.to_tokens, self.side, self.tokens_per_image = to_tokens, side, tokens_per_image
        self.local = threading.local()
        self.similarity: SimilarityReader | None = None

    def read_similarity(self, blocks: Callable[[int], Sequence[int]]) -> None:
        """Also hand per-token similarity features (Nüwa, arXiv 2602.02951): the mean of the outputs of
        ``blocks(depth)``, each token the mean over its patches as for the keys."""
        layers = tower_layers(self.inner, self.reader.block)
        self.similarity = SimilarityReader(layers, blocks(len(layers)), self.salience == "cls")

    def _similarity(self, patch_salience: torch.Tensor) -> torch.Tensor | None:
        """The similarity per token, mapped as the keys are (``to_tokens`` on the patches' values)."""
        if self.similarity is None:
            return None
        return self.to_tokens(patch_salience, self.similarity.take())[1]

    def install(self, rewrite: Rewrite) -> list[RemovableHandle]:
        local = self.local

        def wrap(encode: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(encode)  # generate() reads the encoder's signature to pick its arguments
            def encoded(*args: Any, **kwargs: Any) -> Any:
                output = encode(*args, **kwargs)
                patches = self.reader.take()
                salience, keys = self.to_tokens(*patches)
                similarity = self._similarity(patches[0])
                lengths = getattr(local, "lengths", None)
                if lengths is None:  # generate() encodes before its prefill: rewrite when the prompt comes
                    local.pending = (output, salience, keys, similarity)
                else:
                    self._rewrite(output, (salience, keys, similarity), lengths, rewrite)
                return output

            return encoded

        def before(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            lengths = None if input_ids is None else self.tokens_per_image(input_ids)
            local.lengths = lengths or None
            pending = getattr(local, "pending", None)
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if pending is not None and encoded is pending[0] and lengths:
                local.pending = None
                self._rewrite(pending[0], pending[1:], lengths, rewrite)

        def after(_module: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], _output: Any) -> None:
            local.lengths = None  # an encoding outside a forward (generate's) waits for its prompt

        return [
            self.reader.install(),
            MethodOverride(self.inner, "get_image_features", wrap),
            self.model.register_forward_pre_hook(before, with_kwargs=True),
            self.model.register_forward_hook(after, with_kwargs=True, always_call=True),
            *([] if self.similarity is None else self.similarity.install()),
        ]

    def _rewrite(
        self,
        output: Any,
        signals: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        lengths: list[int],
        rewrite: Rewrite,
    ) -> None:
        """Split the encoding's rows into images of ``lengths`` tokens, rewrite, and put them back in
        the encoding's own structure (one tensor of views, or one entry per prompt)."""
        pooled = output.pooler_output
        one_tensor = isinstance(pooled, torch.Tensor)
        rows = pooled.flatten(0, -2) if one_tensor else torch.cat(list(pooled))
        per_prompt = [] if one_tensor else [int(p.shape[0]) for p in pooled]
        if sum(lengths) != rows.shape[0]:
            raise ValueError(
                f"the prompt holds images of {lengths} visual tokens ({sum(lengths)} in all) but the tower "
                f"encoded {rows.shape[0]}: a vision-side stage needs the images of the call's own prompt"
            )
        salience, keys, similarity = signals
        unit = self.side * self.side
        views = [((self.side, self.side),) * (n // unit) for n in lengths]
        flat_keys = keys.flatten(0, 1)
        per_image = ViewSignals(
            list(rows.split(lengths)),
            list(salience.flatten().split(lengths)),
            list(flat_keys.split(lengths)),
            views,
            similarity=None if similarity is None else list(similarity.flatten(0, 1).split(lengths)),
            crops=[n // unit for n in lengths],
        )
        new = torch.cat(rewrite(per_image))
        output.pooler_output = new.view(pooled.shape) if one_tensor else list(new.split(per_prompt))


def visual_tokens_per_image(image_ids: torch.Tensor) -> list[int]:
    """Visual tokens of each image (row-major over the batch) from an adapter's ``image_ids``."""
    flat = image_ids[image_ids >= 0]
    return torch.bincount(flat).tolist() if flat.numel() else []


def internvit_cls(
    layer: nn.Module, hidden: torch.Tensor, _mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """InternViT's [CLS] query row (softmax over all ``1 + N`` keys, summed over heads) and its keys
    averaged over heads, patches only: ``((V, N), (V, N, h))`` (``layernorm_before``, q/k norms)."""
    modules = by_name(layer)
    attn = modules.attention
    views, tokens, _ = hidden.shape
    with torch.no_grad():
        normed = modules.layernorm_before(hidden)
        q = attn.q_norm(attn.q_proj(normed[:, :1])).view(views, attn.num_heads, attn.head_dim).float()
        k = attn.k_norm(attn.k_proj(normed)).view(views, tokens, attn.num_heads, attn.head_dim).float()
        probs = (torch.einsum("bhd,bthd->bht", q, k) * attn.scale).softmax(dim=-1)
    return probs[..., 1:].sum(dim=1), k[:, 1:].mean(dim=2)
