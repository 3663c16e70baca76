"""Attention masks for compact stages, built by ``transformers``' own mask functions.

A stage's keys are its compact layout (text + kept visual tokens, plus left fillers in a batch)
and, while decoding, the tokens generated since. Because the compact layout keeps the original
order, the ordinary causal rule over compact indices is the causal rule over original positions;
only the 2-D key mask (padding and fillers) differs from the model's own. Using
``create_causal_mask`` keeps the mask format right for every attention implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

from .compat import mask_cache_keyword


def stage_mask(
    config: object,
    key_mask: torch.Tensor,
    query_length: int,
    cache: Cache | None,
    layer_idx: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Mask for ``query_length`` new tokens of a stage whose layers cache at ``layer_idx``.

    ``key_mask``: bool ``(B, kv_length)`` over the stage's cached tokens followed by the new ones.
    """
    batch = key_mask.shape[0]
    shape_only = torch.empty((batch, query_length, 0), dtype=dtype, device=key_mask.device)
    return create_causal_mask(
        config=config,
        inputs_embeds=shape_only,
        attention_mask=key_mask,
        layer_idx=layer_idx,
        **{mask_cache_keyword(): cache},
    )


@dataclass(frozen=True)
class StageMasks:
    """The masks of a compact stage of one decoder: ``recurrent`` are its linear-attention layers
    (Qwen3.5), which cache no keys and take a 2-D padding mask instead of an attention mask."""

    config: object
    num_layers: int
    recurrent: frozenset[int] = frozenset()

    def cache_layer(self, first: int) -> int | None:
        """The first layer from ``first`` on that caches keys (a stage of a hybrid decoder may start at
        a linear-attention layer, whose cache has no length to build masks from); None when the stage
        has only linear-attention layers."""
        return next((j for j in range(first, self.num_layers) if j not in self.recurrent), None)

    def attention(
        self, key_mask: torch.Tensor, length: int, cache: Cache | None, first: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The attention mask of a stage starting at layer ``first`` over ``length`` compact tokens
        (None for a stage without attention layers: its linear-attention layers take ``padding``)."""
        layer = self.cache_layer(first)
        if layer is None:
            return None
        return stage_mask(self.config, key_mask, length, cache, layer, dtype)

    def padding(self, key_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """The 2-D mask linear-attention layers multiply into their input (zeroes padding and
        fillers), or None when the decoder has no such layers."""
        if not self.recurrent:
            return None
        shape_only = like.new_empty(key_mask.shape[0], key_mask.shape[1], 0)
        return create_recurrent_attention_mask(self.config, shape_only, key_mask.long())
