"""Measured cost of token reduction: run a model vanilla and under each method on the same inputs.

Per method (and vanilla) :func:`profile` reports prefill wall time (median and quartiles of
``repeats`` after ``warmup``, interleaved: repeat r runs vanilla, m1, m2, ... in turn so machine
drift hits every configuration alike), time per decode token, the prefill's peak process memory,
the KV cache actually held after prefill next to its theoretical size, theoretical FLOPs and,
with ``ideal=True``, the prefill a zero-overhead router would take (:mod:`vlm_reroute.bench.ideal`).
Every speedup is a ratio of medians with the range the quartiles allow (:mod:`.stats`).

JSON: see :mod:`vlm_reroute.bench.report`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from statistics import median
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from ..adapters import adapter_for
from ..budget import compute_budget
from ..budget.shapes import ModelShape
from ..engine.cache import kv_bytes, kv_lengths
from ..engine.compat import output_cache
from ..methods import TokenReduction
from .ideal import LayerTimer, SpanTimer
from .measure import MemoryStats, environment, prefill_memory, sync
from .report import VANILLA, ProfileReport, ProfileRow
from .stats import ratio, spread

__all__ = ["VANILLA", "ProfileReport", "ProfileRow", "profile"]


# ---- timing helpers ---------------------------------------------------------------------------


class _StepClock(LogitsProcessor):
    """Timestamps every generation step: the gaps after the first are pure decode steps."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _decode_time(model: nn.Module, inputs: dict, tokens: int, device: torch.device) -> float:
    """Seconds per decode token: ``tokens + 1`` greedy tokens, the first one ends the prefill."""
    clock = _StepClock(device)
    n = tokens + 1
    with torch.no_grad():
        model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            logits_processor=LogitsProcessorList([clock]),
        )
    return (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1)


def _context(method: TokenReduction | None, model: nn.Module) -> AbstractContextManager:
    return nullcontext() if method is None else method(model)


def _prefill_kwargs(model: nn.Module) -> dict[str, Any]:
    """Prefill as ``generate`` runs it: with a cache, and logits for the last position only."""
    kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


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
    shape: ModelShape, facts: dict[str, Any], method: TokenReduction | None
) -> tuple[list[int], list[int], Any]:
    """Resolved schedule (keep per image) and its budget, or ``None`` when images differ in size."""
    sizes = facts["image_sizes"]
    if not sizes or len(set(sizes)) != 1:
        return [], [], None
    per_image = sizes[0]
    layers: list[int] = []
    keep: list[int] = []
    if method is not None:
        resolved = method.resolve(shape, per_image)
        layers, keep = map(list, resolved.budget_form(per_image))  # an entry (Nüwa) as layer 0
    reroute = bool(method is not None and method.reroute)
    budget = compute_budget(
        shape, per_image, facts["text_tokens"], layers, keep, reroute, num_images=len(sizes)
    )
    return layers, keep, budget


# ---- the profiler ----------------------------------------------------------------------------


def profile(
    model: nn.Module,
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
    if repeats < 1 or warmup < 0 or decode_tokens < 0:
        raise ValueError(f"repeats={repeats} ≥ 1, warmup={warmup} ≥ 0, decode_tokens={decode_tokens} ≥ 0")
    inputs = dict(inputs)
    device = next(model.parameters()).device
    configs: dict[str, TokenReduction | None] = {VANILLA: None, **methods}
    call = _prefill_kwargs(model)
    shape = ModelShape.from_config(model.config)
    shape = replace(shape, dtype_bytes=torch.empty((), dtype=model.dtype).element_size())
    facts = _input_facts(model, inputs)
    env = environment()  # before the run: the load it reports is other processes', not ours

    def prefill(method: TokenReduction | None) -> tuple[float, Any, Any]:
        with torch.no_grad(), _context(method, model) as trace:
            sync(device)
            start = time.perf_counter()
            out = model(**inputs, **call)
            sync(device)
            return time.perf_counter() - start, out, trace

    timer = LayerTimer(model) if ideal else None
    decode_repeats = repeats if decode_repeats is None else min(decode_repeats, repeats)
    decode_steps = decode_repeats if decode_tokens else 0
    steps = len(configs) * (warmup + repeats * (1 + ideal) + decode_steps + memory) + ideal
    times: dict[str, list[float]] = {name: [] for name in configs}
    decode: dict[str, list[float]] = {name: [] for name in configs}
    layer_runs: dict[str, list[list[float]]] = {name: [] for name in configs}
    outside: list[float] = []
    kv: dict[str, list[int]] = {}
    result: dict[str, tuple[int, Any]] = {}
    with Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("profiling", total=steps)

        def step(label: str) -> None:
            bar.update(task, advance=1, description=label)

        for _ in range(warmup):
            for name, method in configs.items():
                prefill(method)
                if decode_tokens:
                    with _context(method, model):
                        _decode_time(model, inputs, 1, device)
                step(f"warm-up {name}")
        if timer is not None:
            timer.capture(model, inputs, **call)
            step("capturing layer inputs")
        for r in range(repeats):
            for name, method in configs.items():  # vanilla first: its span gives this repeat's outside
                span = SpanTimer(model) if timer is not None and method is None else nullcontext()
                with span:
                    seconds, out, trace = prefill(method)
                times[name].append(seconds)
                kv[name] = kv_lengths(output_cache(out))
                result[name] = (kv_bytes(output_cache(out)), trace)
                del out
                step(f"prefill {name}")
                if timer is not None:  # right after the measured run, so both see the same machine
                    if method is None:
                        outside.append(seconds - span.span)
                    layer_runs[name].append(timer.time_pass(kv[name]))
                    step(f"ideal {name}")
            if decode_tokens and r < decode_repeats:
                for name, method in configs.items():
                    with _context(method, model):
                        decode[name].append(_decode_time(model, inputs, decode_tokens, device))
                    step(f"decode {name}")
        mem: dict[str, MemoryStats] = {}
        if memory:
            for name, method in configs.items():
                with torch.no_grad(), _context(method, model):
                    mem[name] = prefill_memory(model, lambda: model(**inputs, **call))
                step(f"memory {name}")

    vanilla = spread(times[VANILLA])
    rows = []
    for name, method in configs.items():
        layers, keep, budget = _theory(shape, facts, method)
        trace = result[name][1]
        per_layer = (
            trace.tokens_per_layer(shape.num_layers)
            if trace is not None and trace.decisions
            else [facts["visual_tokens"]] * shape.num_layers
        )
        batch_ok = budget is not None and not facts["padded"]
        theory = 1 / budget.flops_exact_ratio if budget else None
        prefill = spread(times[name])
        speedup = ratio(vanilla, prefill)
        ideal_runs = [o + sum(run) for o, run in zip(outside, layer_runs[name], strict=True)]
        ideal_s = spread(ideal_runs) if ideal_runs else None
        ideal_speedup = ratio(vanilla, ideal_s) if ideal_s else None
        ideal_fraction = ratio(ideal_s, prefill) if ideal_s else None
        decode_s = spread(decode[name]) if decode[name] else None
        rows.append(
            ProfileRow(
                name=name,
                method=repr(method) if method is not None else VANILLA,
                reroute=bool(method is not None and method.reroute),
                layers=layers,
                keep=keep,
                prefill_s=prefill.median,
                prefill_iqr_s=[prefill.q1, prefill.q3],
                prefill_runs_s=times[name],
                speedup=speedup.value,
                speedup_range=[speedup.low, speedup.high],
                decode_s_per_token=decode_s.median if decode_s else None,
                decode_iqr_s_per_token=[decode_s.q1, decode_s.q3] if decode_s else None,
                decode_runs_s_per_token=decode[name],
                peak_rss_bytes=mem[name].peak_rss_bytes if name in mem else None,
                peak_rss_increase_bytes=mem[name].increase_bytes if name in mem else None,
                cuda_peak_bytes=mem[name].cuda_peak_bytes if name in mem else None,
                kv_lengths=kv[name],
                kv_tokens=sum(kv[name]) * facts["batch"],
                kv_bytes=result[name][0],
                kv_tokens_theory=budget.kv_tokens * facts["batch"] if batch_ok else None,
                kv_bytes_theory=budget.kv_bytes * facts["batch"] if batch_ok else None,
                visual_tokens_per_layer=per_layer,
                reentered=[d.reentered[0] for d in trace.decisions] if trace is not None else [],
                avg_visual_tokens=sum(per_layer) / len(per_layer),
                flops_ratio=budget.flops_exact_ratio if budget else None,
                flops_ratio_pdrop=budget.flops_pdrop_ratio if budget else None,
                theoretical_speedup=theory,
                efficiency=speedup.value / theory if theory else None,
                ideal_prefill_s=ideal_s.median if ideal_s else None,
                ideal_iqr_s=[ideal_s.q1, ideal_s.q3] if ideal_s else None,
                ideal_runs_s=ideal_runs or None,
                ideal_layer_s=[median(col) for col in zip(*layer_runs[name], strict=True)] or None,
                ideal_speedup=ideal_speedup.value if ideal_speedup else None,
                ideal_speedup_range=[ideal_speedup.low, ideal_speedup.high] if ideal_speedup else None,
                ideal_fraction=ideal_fraction.value if ideal_fraction else None,
                ideal_fraction_range=[ideal_fraction.low, ideal_fraction.high] if ideal_fraction else None,
            )
        )
    return ProfileReport(
        rows=rows,
        model={
            "class": type(model).__name__,
            "shape": asdict(shape),
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(device),
            "attn_implementation": adapter_for(model).text_config._attn_implementation,
        },
        inputs=facts,
        settings={
            "repeats": repeats,
            "warmup": warmup,
            "decode_tokens": decode_tokens,
            "decode_repeats": decode_repeats if decode_tokens else 0,
            "ideal": ideal,
            "prefill_kwargs": call,
            "flops_convention": "exact (GQA-aware MACs, n = text + visual)",
        },
        environment=env,
        outside_decoder_s=median(outside) if outside else None,
    )
