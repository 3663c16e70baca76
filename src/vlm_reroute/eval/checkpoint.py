"""Loading the checkpoint behind the lmms-eval model ``vlm_reroute``.

Separate from :func:`vlm_reroute.loading.load_model` on purpose: lmms-eval's ``--model_args`` allow
``device_map`` (sharding a large model over GPUs) and ``attn_implementation=None`` (transformers'
choice), and a run never probes the Hub first; errors are ``ValueError`` naming what is allowed, which
lmms-eval and ``vlm-reroute eval`` report as one line.
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapters import SUPPORTED_MODELS

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = (None, "sdpa", "eager", "flash_attention_2")


def load_vlm(pretrained: str, dtype: str, attn_implementation: str | None, device_map: str | None) -> Any:
    """A supported checkpoint by its config's architecture; ``ValueError`` names what is allowed."""
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are {', '.join(DTYPES)}")
    if attn_implementation not in ATTENTION:
        raise ValueError(
            f"attn_implementation={attn_implementation!r}: allowed are sdpa, eager, flash_attention_2"
        )
    config = transformers.AutoConfig.from_pretrained(pretrained)
    architectures = getattr(config, "architectures", None) or []
    supported = [a for a in architectures if a in SUPPORTED_MODELS]
    if not supported:
        raise ValueError(
            f"pretrained={pretrained!r} is a {', '.join(architectures) or config.model_type} checkpoint; "
            f"supported classes are {', '.join(SUPPORTED_MODELS)}"
        )
    cls = getattr(transformers, supported[0])
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    return cls.from_pretrained(pretrained, **kwargs).eval()
