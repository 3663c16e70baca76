"""Measured cost of token reduction: run a model vanilla and under each method on the same inputs.

Per method (and vanilla) :func:`profile` reports prefill wall time (median and quartiles of
``repeats`` after ``warmup``, interleaved: repeat r runs vanilla, m1, m2, ... in turn so machine
drift hits every configuration alike), time per decode token, the prefill's peak process memory,
the KV cache actually held after prefill next to its theoretical size, theoretical FLOPs and,
with ``ideal=True``, the prefill a zero-overhead router would take (:mod:`vlm_reroute.bench.ideal`).
Every speedup is a ratio of medians with the range the quartiles allow (:mod:`.stats`).

The runs themselves: :mod:`.rounds`. JSON: see :mod:`vlm_reroute.bench.report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from statistics import median
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..adapters import adapter_for
from ..budget import compute_budget
from ..budget.shapes import ModelShape
from ..methods import TokenReduction
from .measure import environment
from .report import VANILLA, ProfileReport, ProfileRow
from .rounds import Measurements, RoundSettings, prefill_kwargs, run_rounds
from .stats import Spread, ratio, spread

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter

__all__ = ["VANILLA", "ProfileReport", "ProfileRow", "profile"]


# ---- theory ----------------------------------------------------------------------------------


def _input_facts(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Sample 0's token make-up (visual tokens per image, text tokens) and the batch layout."""
    adapter = adapter_for(model)
    ids = inputs["input_ids"]
    visual = adapter.visual_mask(ids)
    mask = inputs.get("attention_mask")
    valid = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(visual)
    image_ids = adapter.image_ids(ids, {k: v for k, v in inputs.items() if k != "input_ids"})
    sizes = torch.bincount(image_ids[0][visual[0]]) if visual[0].any() else None  # sample 0's ids start at 0
    return {
        "batch": ids.shape[0],
        "seq_len": ids.shape[1],
        "padded": bool((~valid).any()),
        "visual_tokens": int(visual[0].sum()),
        "text_tokens": int((valid[0] & ~visual[0]).sum()),
        "images": 0 if sizes is None else int(sizes.numel()),
        "image_sizes": [] if sizes is None else sizes.tolist(),
    }


def _theory(
    shape: ModelShape, facts: dict[str, Any], method: TokenReduction | None, adapter: ModelAdapter
) -> tuple[list[int], list[int], Any]:
    """Resolved schedule (keep per image) and its budget, or ``None`` when images differ in size.

    Resolved on the method bound to ``adapter``'s model, as the engine runs it: on a hybrid decoder
    binding moves the default layers to layers that can score (``methods.base.fit_layers``), and the
    theory must price the layers the decisions were taken at.
    """
    sizes = facts["image_sizes"]
    if not sizes or len(set(sizes)) != 1:
        return [], [], None
    per_image = sizes[0]
    layers: list[int] = []
    keep: list[int] = []
    if method is not None:
        resolved = method.bind(adapter).resolve(shape, per_image)
        layers, keep = map(list, resolved.budget_form(per_image))  # an entry (Nüwa) as layer 0
    reroute = bool(method is not None and method.reroute)
    budget = compute_budget(
        shape, per_image, facts["text_tokens"], layers, keep, reroute, num_images=len(sizes)
    )
    return layers, keep, budget


def _kv_theory(budget: Any, recurrent: tuple[int, ...]) -> tuple[int, int]:
    """Theoretical KV tokens and bytes of one sample: the attention layers' rows only (a hybrid
    decoder's linear-attention layers cache a fixed-size state, no tokens)."""
    rows = [r for r in budget.rows if r.layer not in recurrent]
    return sum(r.kv_tokens for r in rows), sum(r.kv_bytes for r in rows)


def _visual_tokens_per_layer(trace: Any, shape: ModelShape, facts: dict[str, Any]) -> list[int]:
    """Sample 0's visual tokens each decoder layer saw: all of them unless the run decided."""
    if trace is not None and trace.decisions:
        return trace.tokens_per_layer(shape.num_layers)
    return [facts["visual_tokens"]] * shape.num_layers


def _ideal_fields(
    vanilla: Spread, prefill: Spread, outside: list[float], layer_runs: list[list[float]]
) -> dict[str, Any]:
    """The ideal-router fields of a row: outside + the layers alone, per repeat (``None`` if not run)."""
    runs = [o + sum(run) for o, run in zip(outside, layer_runs, strict=True)]
    ideal = spread(runs) if runs else None
    speedup = ratio(vanilla, ideal) if ideal else None
    fraction = ratio(ideal, prefill) if ideal else None
    return {
        "ideal_prefill_s": ideal.median if ideal else None,
        "ideal_iqr_s": [ideal.q1, ideal.q3] if ideal else None,
        "ideal_runs_s": runs or None,
        "ideal_layer_s": [median(col) for col in zip(*layer_runs, strict=True)] or None,
        "ideal_speedup": speedup.value if speedup else None,
        "ideal_speedup_range": [speedup.low, speedup.high] if speedup else None,
        "ideal_fraction": fraction.value if fraction else None,
        "ideal_fraction_range": [fraction.low, fraction.high] if fraction else None,
    }


def _row(
    name: str,
    method: TokenReduction | None,
    shape: ModelShape,
    facts: dict[str, Any],
    measured: Measurements,
    vanilla: Spread,
    adapter: ModelAdapter,
) -> ProfileRow:
    """One configuration's row: its measurements next to what theory predicts for its schedule."""
    layers, keep, budget = _theory(shape, facts, method, adapter)
    trace = measured.traces[name]
    per_layer = _visual_tokens_per_layer(trace, shape, facts)
    batch_ok = budget is not None and not facts["padded"]
    kv_theory = _kv_theory(budget, adapter.recurrent_layers) if batch_ok else None
    # the FLOP formulas price softmax attention in every layer: no theory for a hybrid decoder
    flops = budget if budget is not None and not adapter.recurrent_layers else None
    theory = 1 / flops.flops_exact_ratio if flops else None
    prefill = spread(measured.prefill_s[name])
    speedup = ratio(vanilla, prefill)
    decode = measured.decode_s_per_token[name]
    decode_s = spread(decode) if decode else None
    mem = measured.memory.get(name)
    kv = measured.kv_lengths[name]
    return ProfileRow(
        name=name,
        method=repr(method) if method is not None else VANILLA,
        reroute=bool(method is not None and method.reroute),
        layers=layers,
        keep=keep,
        prefill_s=prefill.median,
        prefill_iqr_s=[prefill.q1, prefill.q3],
        prefill_runs_s=measured.prefill_s[name],
        speedup=speedup.value,
        speedup_range=[speedup.low, speedup.high],
        decode_s_per_token=decode_s.median if decode_s else None,
        decode_iqr_s_per_token=[decode_s.q1, decode_s.q3] if decode_s else None,
        decode_runs_s_per_token=decode,
        peak_rss_bytes=mem.peak_rss_bytes if mem is not None else None,
        peak_rss_increase_bytes=mem.increase_bytes if mem is not None else None,
        cuda_peak_bytes=mem.cuda_peak_bytes if mem is not None else None,
        kv_lengths=kv,
        kv_tokens=sum(n for n in kv if n is not None) * facts["batch"],
        kv_bytes=measured.kv_bytes[name],
        kv_tokens_theory=kv_theory[0] * facts["batch"] if kv_theory else None,
        kv_bytes_theory=kv_theory[1] * facts["batch"] if kv_theory else None,
        visual_tokens_per_layer=per_layer,
        reentered=[d.reentered[0] for d in trace.decisions] if trace is not None else [],
        avg_visual_tokens=sum(per_layer) / len(per_layer),
        flops_ratio=flops.flops_exact_ratio if flops else None,
        flops_ratio_pdrop=flops.flops_pdrop_ratio if flops else None,
        theoretical_speedup=theory,
        efficiency=speedup.value / theory if theory else None,
        **_ideal_fields(vanilla, prefill, measured.outside_decoder_s, measured.ideal_layer_s[name]),
    )


def _model_facts(model: nn.Module, shape: ModelShape) -> dict[str, Any]:
    """What was profiled: class, shape, dtype, device and attention kernel."""
    return {
        "class": type(model).__name__,
        "shape": asdict(shape),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "attn_implementation": adapter_for(model).text_config._attn_implementation,
    }


# ---- the profiler ----------------------------------------------------------------------------


def profile(
    model: PreTrainedModel,
    inputs: Mapping[str, Any],
    methods: Mapping[str, TokenReduction],
    repeats: int = 5,
    warmup: int = 1,
    decode_tokens: int = 8,
    ideal: bool = False,
    progress: bool = True,
    memory: bool = True,
    decode_repeats: int | None = None,
) -> ProfileReport:
    """Profile ``model`` on ``inputs`` vanilla and under each of ``methods`` (name → method).

    ``decode_tokens=0`` skips decoding, ``decode_repeats`` (default: ``repeats``) limits how many
    repeats also time decoding (it costs a whole ``generate`` per configuration); ``memory=False``
    skips the per-configuration memory pass (its in-process marks are indicative: allocator state
    carries over between configurations; use fresh processes for independent marks).
    """
    if VANILLA in methods:
        raise ValueError(f"{VANILLA!r} is added by the profiler; name the methods otherwise")
    settings = RoundSettings.checked(repeats, warmup, decode_tokens, decode_repeats, ideal, memory)
    inputs = dict(inputs)
    configs: dict[str, TokenReduction | None] = {VANILLA: None, **methods}
    shape = ModelShape.from_config(model.config)
    shape = replace(shape, dtype_bytes=torch.empty((), dtype=model.dtype).element_size())
    facts = _input_facts(model, inputs)
    env = environment()  # before the run: the load it reports is other processes', not ours
    measured = run_rounds(model, inputs, configs, settings, progress)
    vanilla = spread(measured.prefill_s[VANILLA])
    outside = measured.outside_decoder_s
    return ProfileReport(
        rows=[
            _row(name, method, shape, facts, measured, vanilla, adapter_for(model))
            for name, method in configs.items()
        ],
        model=_model_facts(model, shape),
        inputs=facts,
        settings={
            "repeats": repeats,
            "warmup": warmup,
            "decode_tokens": decode_tokens,
            "decode_repeats": settings.decode_repeats,
            "ideal": ideal,
            "prefill_kwargs": prefill_kwargs(model),
            "flops_convention": "exact (GQA-aware MACs, n = text + visual)",
        },
        environment=env,
        outside_decoder_s=median(outside) if outside else None,
    )
