"""The measuring rounds of one profile: warm-up, interleaved timed repeats, then a memory pass.

Repeat r runs vanilla, m1, m2, ... in turn (and, with ``ideal``, each configuration's layers alone
right after its run), so machine drift hits every configuration alike instead of whichever ran
last. Decoding is timed in separate ``generate`` calls after a repeat's prefills, and memory in
one last pass, so neither disturbs the prefill timings. :func:`run_rounds` returns the raw
:class:`Measurements`; :mod:`.profiler` turns them into a report.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from ..adapters import adapter_for
from ..engine.cache import kv_bytes, kv_lengths
from ..engine.compat import output_cache
from ..methods import TokenReduction
from .ideal import LayerTimer, SpanTimer
from .measure import MemoryStats, prefill_memory, sync

__all__ = ["Measurements", "RoundSettings", "prefill_kwargs", "run_rounds"]

#: Configuration name → method; ``None`` runs the model vanilla.
Configs = Mapping[str, TokenReduction | None]


@dataclass(frozen=True)
class RoundSettings:
    """How much one profile measures, checked once (:meth:`checked`).

    ``decode_repeats`` is already the effective count: at most ``repeats``, and 0 when no decode
    tokens are timed (the report shows this value).
    """

    repeats: int
    warmup: int
    decode_tokens: int
    decode_repeats: int
    ideal: bool
    memory: bool

    @classmethod
    def checked(
        cls,
        repeats: int,
        warmup: int,
        decode_tokens: int,
        decode_repeats: int | None,
        ideal: bool,
        memory: bool,
    ) -> RoundSettings:
        """Validated settings; ``decode_repeats=None`` decodes in every repeat."""
        if repeats < 1 or warmup < 0 or decode_tokens < 0:
            raise ValueError(f"repeats={repeats} ≥ 1, warmup={warmup} ≥ 0, decode_tokens={decode_tokens} ≥ 0")
        decode_repeats = repeats if decode_repeats is None else min(decode_repeats, repeats)
        return cls(repeats, warmup, decode_tokens, decode_repeats if decode_tokens else 0, ideal, memory)

    def steps(self, configs: int) -> int:
        """Progress-bar steps of a run over ``configs`` configurations (one per measured action)."""
        per_config = self.warmup + self.repeats * (1 + self.ideal) + self.decode_repeats + self.memory
        # with ``ideal``: one capture, then one untimed prefill per configuration for its layer lengths
        return configs * (per_config + self.ideal) + self.ideal


@dataclass
class Measurements:
    """Everything the rounds recorded, by configuration name; runs are in repeat order.

    It exists to keep measuring (:mod:`.rounds`) apart from reporting (:mod:`.profiler`).
    ``ideal_layer_s[name][r]`` holds every decoder layer's seconds alone on the token counts of
    run r; ``outside_decoder_s[r]`` is vanilla's time outside the decoder layers in repeat r.
    ``kv_lengths``, ``kv_bytes`` and ``traces`` are the last repeat's (identical in every repeat);
    ``kv_lengths`` is ``None`` at a linear-attention layer (a fixed-size state, no tokens: Qwen3.5).
    ``layer_tokens[name]`` is the sequence length each decoder layer processed (recorded in one
    untimed prefill, with ``ideal``): the ideal passes run every layer on it, the linear-attention
    layers of a hybrid decoder included.
    """

    prefill_s: dict[str, list[float]]
    decode_s_per_token: dict[str, list[float]]
    ideal_layer_s: dict[str, list[list[float]]]
    outside_decoder_s: list[float] = field(default_factory=list)
    kv_lengths: dict[str, list[int | None]] = field(default_factory=dict)
    layer_tokens: dict[str, list[int]] = field(default_factory=dict)
    kv_bytes: dict[str, int] = field(default_factory=dict)
    traces: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, MemoryStats] = field(default_factory=dict)

    @classmethod
    def empty(cls, names: Iterable[str]) -> Measurements:
        names = list(names)
        return cls({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names})


def prefill_kwargs(model: nn.Module) -> dict[str, Any]:
    """Prefill as ``generate`` runs it: with a cache, and logits for the last position only."""
    kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


class _StepClock(LogitsProcessor):
    """Timestamps every generation step: the gaps after the first are pure decode steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _routed(method: TokenReduction | None, model: nn.Module) -> AbstractContextManager:
    """``method`` installed on ``model`` for the block, or nothing for vanilla."""
    return nullcontext() if method is None else method(model)


class _LayerLengths:
    """Records the sequence length each decoder layer is called with (forward pre-hooks).

    Used in one untimed prefill per configuration: what a routed prefill ran every layer on,
    compact stages and batch fillers included, for every kind of layer (a linear-attention layer
    caches no tokens, so the KV lengths cannot tell it).
    """

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        self.layers = list(layers)
        self.lengths: list[int] = [0] * len(self.layers)
        self.handles: list[Any] = []

    def __enter__(self) -> _LayerLengths:
        def hook(j: int) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.lengths[j] = int(hidden.shape[1])

            return record

        self.handles = [
            layer.register_forward_pre_hook(hook(j), with_kwargs=True) for j, layer in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Rounds:
    """One profile's runs on one model and input; ``step`` advances the progress bar by one action."""

    def __init__(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        configs: Configs,
        settings: RoundSettings,
        step: Callable[[str], None],
    ) -> None:
        self.model, self.inputs, self.configs = model, inputs, configs
        self.settings, self.step = settings, step
        self.device = next(model.parameters()).device
        self.call = prefill_kwargs(model)
        self.timer = LayerTimer(model) if settings.ideal else None
        self.record = Measurements.empty(configs)

    def prefill(self, method: TokenReduction | None) -> tuple[float, Any, Any]:
        """Seconds of one prefill under ``method``, its output and the method's trace."""
        with torch.no_grad(), _routed(method, self.model) as trace:
            sync(self.device)
            start = time.perf_counter()
            out = self.model(**self.inputs, **self.call)
            sync(self.device)
            return time.perf_counter() - start, out, trace

    def layer_lengths(self, method: TokenReduction | None) -> list[int]:
        """The sequence length each decoder layer runs on under ``method`` (one untimed prefill). The
        hooks go on after the method's own, so they see what its stages hand each layer."""
        layers = adapter_for(self.model).layers
        with torch.no_grad(), _routed(method, self.model), _LayerLengths(layers) as lengths:
            self.model(**self.inputs, **self.call)
        return lengths.lengths

    def decode_time(self, tokens: int) -> float:
        """Seconds per decode token: ``tokens + 1`` greedy tokens, the first one ends the prefill."""
        clock = _StepClock(self.device)
        n = tokens + 1
        model: Any = self.model  # a generative PreTrainedModel (typed as nn.Module, it has no generate)
        with torch.no_grad():
            model.generate(
                **self.inputs,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                logits_processor=LogitsProcessorList([clock]),
            )
        return (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1)

    def warm_up(self) -> None:
        for _ in range(self.settings.warmup):
            for name, method in self.configs.items():
                self.prefill(method)
                if self.settings.decode_tokens:
                    with _routed(method, self.model):
                        self.decode_time(1)
                self.step(f"warm-up {name}")
        if self.timer is not None:
            self.timer.capture(self.model, self.inputs, **self.call)
            self.step("capturing layer inputs")
            for name, method in self.configs.items():
                self.record.layer_tokens[name] = self.layer_lengths(method)
                self.step(f"layer lengths {name}")

    def timed_prefills(self) -> None:
        """One repeat's prefill of every configuration, vanilla first: its decoder span gives the
        repeat's outside time; each configuration's ideal pass follows its own run."""
        record = self.record
        for name, method in self.configs.items():
            span = SpanTimer(self.model) if self.timer is not None and method is None else None
            with span if span is not None else nullcontext():
                seconds, out, trace = self.prefill(method)
            record.prefill_s[name].append(seconds)
            cache = output_cache(out)
            record.kv_lengths[name] = kv_lengths(cache)
            record.kv_bytes[name] = kv_bytes(cache)
            record.traces[name] = trace
            del out, cache
            self.step(f"prefill {name}")
            if self.timer is not None:  # right after the measured run, so both see the same machine
                if span is not None:  # the vanilla run
                    record.outside_decoder_s.append(seconds - span.span)
                record.ideal_layer_s[name].append(self.timer.time_pass(record.layer_tokens[name]))
                self.step(f"ideal {name}")

    def timed_decodes(self) -> None:
        for name, method in self.configs.items():
            with _routed(method, self.model):
                self.record.decode_s_per_token[name].append(self.decode_time(self.settings.decode_tokens))
            self.step(f"decode {name}")

    def memory_pass(self) -> None:
        """Each configuration's prefill peak memory (marks carry allocator state between runs)."""
        for name, method in self.configs.items():
            with torch.no_grad(), _routed(method, self.model):
                self.record.memory[name] = prefill_memory(
                    self.model, lambda: self.model(**self.inputs, **self.call)
                )
            self.step(f"memory {name}")

    def run(self) -> Measurements:
        self.warm_up()
        for r in range(self.settings.repeats):
            self.timed_prefills()
            if r < self.settings.decode_repeats:
                self.timed_decodes()
        if self.settings.memory:
            self.memory_pass()
        return self.record


def run_rounds(
    model: nn.Module, inputs: dict[str, Any], configs: Configs, settings: RoundSettings, progress: bool
) -> Measurements:
    """Every run of one profile, with a transient progress bar on stderr unless ``progress=False``."""
    with Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("profiling", total=settings.steps(len(configs)))
        rounds = _Rounds(
            model, inputs, configs, settings, lambda label: bar.update(task, advance=1, description=label)
        )
        return rounds.run()
