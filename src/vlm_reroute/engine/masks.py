"""Attention masks for compact stages, built by ``transformers``' own mask functions.

A stage's keys are its compact layout (text + kept visual tokens, plus left fillers in a batch)
and, while decoding, the tokens generated since. Because the compact layout keeps the original
order, the ordinary causal rule over compact indices is the causal rule over original positions;
only the 2-D key mask (padding and fillers) differs from the model's own. Using
``create_causal_mask`` keeps the mask format right for every attention implementation.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

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
