"""vlm-reroute: recoverable visual-token routing (and pruning) for Hugging Face VLMs."""

from .adapters import SUPPORTED_MODELS
from .cache import kv_bytes, kv_lengths
from .methods import FastV, PDrop, TokenReduction
from .trace import Decision, Trace

__all__ = [
    "SUPPORTED_MODELS",
    "Decision",
    "FastV",
    "PDrop",
    "TokenReduction",
    "Trace",
    "kv_bytes",
    "kv_lengths",
]
__version__ = "0.1.0"
