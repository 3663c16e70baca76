"""Reading what a KV cache holds, and the routed cache: a DynamicCache that knows its stage layouts.

After a routed prefill, layer ``j``'s cache holds only the tokens of ``j``'s stage, so its layers
have different lengths, and decoding needs each stage's key mask (padding and batch fillers of
the compact layout). The prefill turns the cache it filled into a :class:`RoutedCache` that
carries those masks. Only the routed model, inside the block that filled it, can continue it: any
other use (after the block, in another block, by a direct decoder call) raises a clear error
instead of attending over misaligned keys. Beam reordering and batch selection keep the masks'
rows in step with the cache's.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


def kv_lengths(cache: Cache) -> list[int | None]:
    """Tokens cached by each decoder layer (they differ per stage after a routed prefill); ``None``
    for a linear-attention layer, whose cache is a fixed-size state (hybrid decoders: Qwen3.5)."""
    return [
        cache.get_seq_length(i) if isinstance(layer, CacheLayerMixin) else None
        for i, layer in enumerate(cache.layers)
    ]


def kv_bytes(cache: Cache) -> int:
    """Bytes held by the keys and values of every layer."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass(frozen=True)
class Routing:
    """What decoding a routed cache needs, kept on the cache after its prefill.

    Each stage's layers cached only that stage's tokens (Reroute, arXiv 2606.12412, and pruning
    alike), so each stage decodes against its own key mask.

    Attributes
    ----------
    method : str
        The method that filled the cache.
    key_masks : tuple of (int, Tensor)
        Per stage: its first decoder layer and the bool ``(B, L)`` key mask of the prompt's compact
        layout.
    prompt_length : int
        The prompt's length in full-sequence positions.
    """

    method: str
    key_masks: tuple[tuple[int, torch.Tensor], ...]
    prompt_length: int

    def rows(self, index: torch.Tensor) -> Routing:
        return replace(self, key_masks=tuple((first, mask[index]) for first, mask in self.key_masks))


class Owner(Protocol):
    """The executor that filled a routed cache (see ``RoutingExecutor.serves``).

    A protocol, so that the cache module need not import the executor.
    """

    def serves(self, cache: Cache) -> bool: ...


class RoutedCache(DynamicCache):
    """A :class:`DynamicCache` filled by a routed prefill (made by :func:`claim`, never built).

    Its layers hold different numbers of tokens, one count per stage (Reroute, arXiv 2606.12412;
    the prune baselines FastV, arXiv 2403.06764, and PyramidDrop, arXiv 2410.17247, alike). It exists
    so that only the routed model inside the block that filled it can continue it: any other use
    raises (:meth:`refusal` says why) instead of attending over misaligned keys; beam reordering
    and batch selection keep its key masks' rows in step with the cache's.
    """

    _vlm_owner: weakref.ref
    _vlm_routing: Routing | None  # None while its prefill runs, or if that prefill raised
    _vlm_method: str

    @property
    def routing(self) -> Routing | None:
        return self._vlm_routing

    def owned_by(self, owner: Owner) -> bool:
        return self._vlm_owner() is owner

    def refusal(self) -> str:
        """Why this cache cannot be continued here."""
        lengths = kv_lengths(self)
        if self._vlm_routing is None:
            return (
                f"this KV cache belongs to a routed prefill of {self._vlm_method} that raised: its layers "
                f"are partly filled ({lengths} tokens); start again from a new cache"
            )
        return (
            f"this KV cache was filled by a routed prefill of {self._vlm_method} whose block has ended "
            f"(or is not this one): its layers hold different numbers of tokens ({lengths}), so only the "
            "routed model inside that same `with` block can continue it; continue generating inside the "
            "block, or run a new prefill"
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self._vlm_owner()
        if owner is None or not owner.serves(self):
            raise RuntimeError(self.refusal())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        routing = self._vlm_routing
        if routing is not None and tokens_to_remove < 0:
            generated = self.get_seq_length() - routing.prompt_length
            if -tokens_to_remove > generated:
                raise ValueError(
                    f"crop({tokens_to_remove}) would cut into the routed prompt: this cache holds "
                    f"{generated} tokens after its {routing.prompt_length}-token prompt, and the routing "
                    "decisions cover the whole prompt"
                )
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self._vlm_routing is not None:
            batch = self._vlm_routing.key_masks[0][1].shape[0]
            self._select_rows(torch.arange(batch).repeat_interleave(repeats))

    def reset(self) -> None:
        """Empty again: an ordinary DynamicCache, free for any prefill."""
        super().reset()
        # reclassing in place, which the type system cannot follow (``self`` stays typed RoutedCache)
        self.__class__ = DynamicCache  # type: ignore[assignment]

    def _select_rows(self, index: torch.Tensor) -> None:
        if self._vlm_routing is not None:
            device = self._vlm_routing.key_masks[0][1].device
            self._vlm_routing = self._vlm_routing.rows(index.to(device))


def claim(cache: Cache, owner: Owner, method: str) -> RoutedCache:
    """Turn the (empty) DynamicCache a routed prefill is about to fill into a RoutedCache."""
    if not isinstance(cache, RoutedCache):
        cache.__class__ = RoutedCache
    routed = cast(RoutedCache, cache)  # reclassed in place just above, which mypy cannot follow
    routed._vlm_owner = weakref.ref(owner)
    routed._vlm_routing = None
    routed._vlm_method = method
    return routed
