"""Token-reduction methods: one small dataclass per method, applied as a reversible context manager."""

from .base import FastV, PDrop, TokenReduction

__all__ = ["FastV", "PDrop", "TokenReduction"]
