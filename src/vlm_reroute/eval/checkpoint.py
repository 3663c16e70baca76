"""Loading the checkpoint behind the lmms-eval model ``vlm_reroute``.

The class lookup and the ``from_pretrained`` keywords are :mod:`vlm_reroute.loading`'s (one rule for
which class loads a checkpoint); this front end keeps the plugin's own contract, which
:func:`~vlm_reroute.loading.load_model` does not have: lmms-eval's ``--model_args`` allow ``device_map``
(sharding a large model over GPUs) and ``attn_implementation=None`` (transformers' choice), a run never
probes the Hub first, the model stays where ``from_pretrained`` put it (the plugin places it), and errors
are ``ValueError`` naming the ``model_args`` value, or the libraries' own exceptions, which lmms-eval and
``vlm-reroute eval`` report as one line (``load_model`` wraps them in a ``LoadError`` instead).
"""

from __future__ import annotations

from typing import Any

from ..loading import ATTENTION as _ATTENTION
from ..loading import DTYPES, checkpoint_class, pretrained_kwargs

ATTENTION = (None, *_ATTENTION)


def load_vlm(pretrained: str, dtype: str, attn_implementation: str | None, device_map: str | None) -> Any:
    """A supported checkpoint by its config's architecture; ``ValueError`` names what is allowed."""
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are {', '.join(DTYPES)}")
    if attn_implementation not in ATTENTION:
        raise ValueError(f"attn_implementation={attn_implementation!r}: allowed are {', '.join(_ATTENTION)}")
    config = transformers.AutoConfig.from_pretrained(pretrained)
    cls = checkpoint_class(config, f"pretrained={pretrained!r}", error=ValueError)
    return cls.from_pretrained(pretrained, **pretrained_kwargs(dtype, attn_implementation, device_map)).eval()
