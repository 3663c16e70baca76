"""Reading what a KV cache actually holds."""

from __future__ import annotations

from transformers.cache_utils import Cache


def kv_lengths(cache: Cache) -> list[int]:
    """Tokens cached by each decoder layer (they differ per stage after a routed prefill)."""
    return [cache.get_seq_length(i) for i in range(len(cache.layers))]


def kv_bytes(cache: Cache) -> int:
    """Bytes held by the keys and values of every layer."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
