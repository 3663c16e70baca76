"""Decode steps on a routed cache: each stage attends over its own cache with a mask of its length.

A stage's cache holds the prompt's compact layout (text, kept visual tokens, left fillers in a
batch) followed by every token decoded since (accepted drafts included). The key mask is the
prompt's stored mask followed by the call's 2-D attention mask over the tokens after the prompt
(all ones when ``generate()`` dropped an all-ones mask).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .calls import Call
from .masks import stage_mask


def decode_mask(config: object, call: Call, layer_idx: int, hidden: torch.Tensor) -> Any:
    """The mask of layer ``layer_idx``'s stage for this decode step (built once per stage)."""
    cache = call.cache
    routing = cache.routing if cache is not None else None
    if cache is None or routing is None:  # classify() sets both on every decode call
        raise RuntimeError("decode_mask: this call is not a decode step on a routed cache")
    stage = max(s for s, (first, _) in enumerate(routing.key_masks) if first <= layer_idx)
    if stage not in call.decode_masks:
        first, key_mask = routing.key_masks[stage]
        # a hybrid decoder's stage may start at a linear-attention layer, which has no length
        first = next(j for j in range(first, layer_idx + 1) if isinstance(cache.layers[j], CacheLayerMixin))
        query = hidden.shape[1]
        tail = cache.get_seq_length(first) + query - key_mask.shape[1]
        if tail < query:
            raise RuntimeError(
                f"the routed cache of layer {first} holds {cache.get_seq_length(first)} tokens, fewer than "
                f"its stage's {key_mask.shape[1]}-token prompt: it was cut outside the routed model"
            )
        if call.mask2d is not None:
            new = call.mask2d[:, -tail:].to(device=key_mask.device, dtype=torch.bool)
        else:
            new = key_mask.new_ones(key_mask.shape[0], tail)
        call.decode_masks[stage] = stage_mask(
            config, torch.cat([key_mask, new], dim=1), query, cache, first, hidden.dtype
        )
    return call.decode_masks[stage]
