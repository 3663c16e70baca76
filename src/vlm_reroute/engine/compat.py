"""The ``transformers`` releases routing was tested with, and the internals it relies on.

The engine hooks ``transformers`` below its public API: the keyword under which the KV cache
reaches the model, its decoder and each decoder layer; the cache's per-layer objects; the mask
function's signature; ``generate()``'s keywords. These change with most monthly releases, and a
rename does not fail: a hook that reads a keyword no longer passed sees "no cache" and routes a
decode step as a prefill, which computes something plausible and wrong (transformers 5.24 renamed
``past_key_values`` to ``cache``). So applying a method

1. refuses a ``transformers`` outside ``versions.TRANSFORMERS_RANGE`` with one line naming the installed
   version, the tested range and the opt-in ``versions.OPT_IN`` (set to ``1``, it downgrades the refusal
   to one warning), and
2. verifies, whatever the version, the internals it reads (:func:`check_internals`), refusing with
   one line when one is missing, so the next rename fails at the ``with`` line, not inside the model.

The cache keyword is read from the installed release's own decoder-layer signature
(:func:`cache_keyword`); calls may carry either name (a user's ``past_key_values=`` is still
accepted, deprecated, by 5.24), so :func:`cache_argument` reads both.
"""

from __future__ import annotations

import inspect
import os
import warnings
from functools import cache
from typing import Any, NoReturn

import transformers
from torch import nn

from ..versions import OPT_IN, TRANSFORMERS_RANGE, in_range, range_text

#: The keywords under which releases pass the KV cache (newest first).
CACHE_KEYWORDS = ("cache", "past_key_values")


class UntestedTransformersWarning(UserWarning):
    """Routing under a ``transformers`` release outside the tested range, allowed by ``OPT_IN``.

    A category of its own, so that a user who opted in can filter this one warning.
    """


def check_version(version: str | None = None) -> None:
    """Refuse (or, with ``OPT_IN=1`` set, warn about) a ``transformers`` outside the tested range."""
    installed = version if version is not None else transformers.__version__
    if in_range(installed, TRANSFORMERS_RANGE):
        return
    tested = range_text(TRANSFORMERS_RANGE)
    message = (
        f"transformers {installed} is outside the range vlm-reroute was tested with ({tested}): routing "
        "hooks transformers internals that change between releases, so an untested release may route "
        "wrongly without an error"
    )
    if os.environ.get(OPT_IN) == "1":
        warnings.warn(
            f"{message}; running anyway because {OPT_IN}=1", UntestedTransformersWarning, stacklevel=3
        )
        return
    raise RuntimeError(
        f"{message}. Install a tested release (pip install 'transformers{tested}'), or set {OPT_IN}=1 to "
        "run anyway"
    )


def cache_keyword(model: nn.Module, layers: list[nn.Module]) -> str:
    """The keyword under which this release passes the KV cache to ``model`` and its decoder layers.

    Read from the decoder layers' own signatures (every layer class: a hybrid decoder mixes two) and
    checked against the model's forward and ``generate()``'s cache name, so the engine reads the
    cache where the release puts it.
    """
    from transformers.generation import utils as generation_utils

    found = set()
    for owner in {type(model), *(type(layer) for layer in layers)}:
        params = inspect.signature(owner.forward).parameters
        names = [name for name in CACHE_KEYWORDS if name in params]
        if not names:
            _refuse(
                f"{owner.__name__}.forward takes none of {list(CACHE_KEYWORDS)} (the KV cache is passed "
                "under a name vlm-reroute does not know)"
            )
        found.add(names[0])
    if len(found) != 1:
        _refuse(f"the model and its decoder layers take the KV cache under different names {sorted(found)}")
    keyword = found.pop()
    generate_name = getattr(generation_utils, "ALL_CACHE_NAMES", [None])[0]
    if generate_name != keyword:
        _refuse(f"generate() passes the KV cache as {generate_name!r}, the layers take {keyword!r}")
    return keyword


def cache_argument(kwargs: dict[str, Any], keyword: str) -> Any:
    """The KV cache a call carries under ``keyword`` (None when it has none).

    Under ``cache`` (transformers 5.24 on) a caller's ``past_key_values=`` is still the cache: the
    model renames it, deprecated. Under ``past_key_values`` (5.23) a ``cache=`` is ignored, as the
    model ignores it.
    """
    value = kwargs.get(keyword)
    if value is None and keyword == "cache":
        value = kwargs.get("past_key_values")
    return value


def output_cache(output: Any) -> Any:
    """The KV cache a model output holds (``cache`` from 5.24 on, ``past_key_values`` before), read
    without the deprecation warning the old attribute gives."""
    fields = dict(output)
    return fields.get("cache", fields.get("past_key_values"))


def check_internals(model: nn.Module, layers: list[nn.Module]) -> str:
    """Verify the ``transformers`` internals routing reads; return the cache keyword.

    Checked: the cache keyword of the model, its decoder layers and ``generate()``;
    ``create_causal_mask``'s parameters; a dynamic cache's per-layer objects and methods; that
    ``generate()`` drops the image inputs after its prefill. Each missing piece is refused with one
    line naming it and the tested range.
    """
    keyword = cache_keyword(model, layers)
    mask_cache_keyword()
    _check_cache_layers()
    _check_generation()
    check_hub_kernels(layers)
    return keyword


#: Hub kernels (``kernel_layer_name`` of ``transformers``' ``use_kernel_forward_from_hub``) that may
#: replace a forward inside a routed layer: row-wise norms, elementwise activations, RoPE and the
#: linear-attention ops, which compute on whatever tokens the layer is given, as the PyTorch code
#: does. A kernel replacing anything else (a whole module such as ``Qwen3_5GatedDeltaNet``, or a
#: function that reads and writes the cache itself) was never run under routing, and is refused.
ROUTABLE_KERNELS = frozenset(
    {
        "RMSNorm",
        "RMSNormGated",
        "SiLU",
        "GeLU",
        "GeluTanh",
        "QuickGELU",
        "FastGELU",
        "NewGELU",
        "rotary_pos_emb",
        "chunk_gated_delta_rule",
        "fused_recurrent_gated_delta_rule",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    }
)


def check_hub_kernels(layers: list[nn.Module]) -> None:
    """Refuse decoder layers in which ``from_pretrained`` (kernelized by default from transformers
    5.25 on) put a hub kernel outside :data:`ROUTABLE_KERNELS`; on CPU nothing is replaced."""
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            for owner in (module, *getattr(module, "_kernel_funcs", {}).values()):
                repo = owner.__dict__.get("_kernel_repo")  # set by kernels.kernelize on a replaced forward
                kernel = getattr(type(owner), "kernel_layer_name", None)
                if repo is not None and kernel not in ROUTABLE_KERNELS:
                    where = f"layers[{i}].{name}" if name else f"layers[{i}]"
                    raise RuntimeError(
                        f"{where} runs the hub kernel {kernel!r} ({repo}), which vlm-reroute has not been "
                        "checked under: load the model with from_pretrained(..., use_kernels=False) "
                        "(or set USE_HUB_KERNELS=0) to route it"
                    )


@cache
def _check_generation() -> None:
    from transformers.generation import utils as generation_utils

    dropped = getattr(generation_utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL", ())
    for name in ("pixel_values", "mm_encoder_outputs"):
        if name not in dropped:
            _refuse(
                f"generate() no longer drops {name!r} after its prefill (decode steps would carry images)"
            )


@cache
def mask_cache_keyword() -> str:
    """The keyword under which ``create_causal_mask`` takes the cache (checked with its other
    parameters the engine passes)."""
    from transformers.masking_utils import create_causal_mask

    name = "transformers.masking_utils.create_causal_mask"
    params = inspect.signature(create_causal_mask).parameters
    keyword = next((k for k in CACHE_KEYWORDS if k in params), None)
    if keyword is None:
        _refuse(f"{name} takes none of {list(CACHE_KEYWORDS)}")
    _require(create_causal_mask, name, ("config", "inputs_embeds", "attention_mask", "layer_idx"))
    return keyword


@cache
def _check_cache_layers() -> None:
    """A dynamic cache filled for one layer must expose what the engine reads: ``layers[i].keys`` /
    ``values`` and per-layer ``get_seq_length(i)``, ``get_mask_sizes``, ``crop`` and the beam hooks."""
    import torch
    from transformers import cache_utils

    for name in ("Cache", "DynamicCache", "CacheLayerMixin"):
        if not hasattr(cache_utils, name):
            _refuse(f"transformers.cache_utils.{name} is missing")
    dynamic = cache_utils.DynamicCache
    for method in ("get_seq_length", "get_mask_sizes", "update", "crop", "reset", "reorder_cache"):
        if not callable(getattr(dynamic, method, None)):
            _refuse(f"DynamicCache.{method} is missing")
    probe = dynamic()
    probe.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    layer = probe.layers[0] if getattr(probe, "layers", None) else None
    if not isinstance(layer, cache_utils.CacheLayerMixin):
        _refuse("DynamicCache.layers[0] is not a CacheLayerMixin after update()")
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.shape[-2] == 3):
        _refuse("DynamicCache.layers[0] holds no keys/values tensors of the tokens it was given")
    if probe.get_seq_length(0) != 3:
        _refuse(f"DynamicCache.get_seq_length(0) gives {probe.get_seq_length(0)} for 3 cached tokens")


def _require(function: Any, name: str, parameters: tuple[str, ...]) -> None:
    params = inspect.signature(function).parameters
    missing = [p for p in parameters if p not in params]
    if missing:
        _refuse(f"{name} has no parameter {', '.join(missing)}")


def _refuse(what: str) -> NoReturn:
    raise RuntimeError(
        f"transformers {transformers.__version__}: {what}; vlm-reroute routes by these internals and "
        f"refuses to run without them (tested: transformers{range_text(TRANSFORMERS_RANGE)})"
    )
