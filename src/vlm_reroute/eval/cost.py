"""Cost of each answered sample: schedule as executed, avg_T, theoretical TFLOPs and KV bytes, time, memory.

Token counts come from the method's trace of the prefill (per sample), so they are what ran, not what
was asked. FLOPs and KV bytes use the budget module's conventions (``vlm_reroute.budget``):
multiply-accumulates of the decoder prefill with ``n`` = text + visual tokens entering each layer,
FastV's formula as ``tflops`` (PyramidDrop's and the GQA-aware exact count alongside), KV bytes after
prefill in the model's dtype.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..budget import ModelShape, layer_flops


@dataclass
class SampleCost:
    """Cost of one answered sample, as its prefill ran.

    ``layers``/``kept`` are the decisions that ran (empty for vanilla).

    References
    ----------
    ``avg_visual_tokens`` is avg_T, the mean over decoder layers of the visual tokens each carried
    (docs/budgets.md). ``tflops`` is FastV's count (arXiv 2403.06764, Eq. 5), ``tflops_pdrop``
    PyramidDrop's (arXiv 2410.17247, three-matrix FFN), ``tflops_exact`` the GQA-aware count: all
    multiply-accumulates of the decoder layers with ``n`` = text + visual tokens entering each.
    """

    method: str
    layers: list[int]
    kept: list[int]
    text_tokens: int
    visual_tokens: int
    tokens_per_layer: list[int]
    avg_visual_tokens: float
    tflops: float
    tflops_pdrop: float
    tflops_exact: float
    kv_bytes: int
    prefill_ms: float
    batch_size: int
    peak_memory_bytes: int | None
    peak_memory_kind: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_shape(model: Any) -> ModelShape:
    """The decoder shape of a loaded model, in the dtype its weights have."""
    shape = ModelShape.from_config(model.config)
    return replace(shape, dtype_bytes=next(model.parameters()).element_size())


def sample_costs(
    shape: ModelShape,
    method: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    trace: Any,
    prefill_ms: float,
    peak: tuple[int | None, str],
) -> list[SampleCost]:
    """One :class:`SampleCost` per row of a (left-padded) batch; ``trace`` is ``None`` for vanilla."""
    costs = []
    batch = input_ids.shape[0]
    per_token_layer = 2 * shape.num_kv_heads * shape.head_dim * shape.dtype_bytes
    for b in range(batch):
        real = attention_mask[b].bool()
        visual = int((input_ids[b][real] == image_token_id).sum())
        text = int(real.sum()) - visual
        if trace is not None and trace.decisions:
            per_layer = trace.tokens_per_layer(shape.num_layers, b)
            layers = [d.layer for d in trace.decisions]
            kept = [d.kept[b] for d in trace.decisions]
        else:
            per_layer, layers, kept = [visual] * shape.num_layers, [], []
        n = [text + v for v in per_layer]
        costs.append(
            SampleCost(
                method=method,
                layers=layers,
                kept=kept,
                text_tokens=text,
                visual_tokens=visual,
                tokens_per_layer=per_layer,
                avg_visual_tokens=sum(per_layer) / shape.num_layers,
                tflops=sum(layer_flops(shape, x, "fastv") for x in n) / 1e12,
                tflops_pdrop=sum(layer_flops(shape, x, "pdrop") for x in n) / 1e12,
                tflops_exact=sum(layer_flops(shape, x, "exact") for x in n) / 1e12,
                kv_bytes=sum(n) * per_token_layer,
                prefill_ms=prefill_ms / batch,
                batch_size=batch,
                peak_memory_bytes=peak[0],
                peak_memory_kind=peak[1],
            )
        )
    return costs


class PrefillTimer:
    """Times the first forward of each ``generate()`` call (the prefill) with a pre/post hook pair.

    It exists because the prefill is what visual-token reduction speeds up: a whole ``generate()``
    also holds the decode steps, whose time the prefill's would drown in.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ms: float | None = None
        self._start: float | None = None

    def _pre(self, module: Any, args: Any, kwargs: Any) -> None:
        if self.ms is None and self._start is None:
            _sync(self.model)
            self._start = time.perf_counter()

    def _post(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if self.ms is None and self._start is not None:
            _sync(self.model)
            self.ms = (time.perf_counter() - self._start) * 1e3

    @contextlib.contextmanager
    def __call__(self) -> Iterator[PrefillTimer]:
        self.ms, self._start = None, None
        handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True),
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _sync(model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(model: torch.nn.Module) -> Iterator[list]:
    """Yields a list that receives ``(bytes, kind)``: CUDA's peak allocation during the block, or the
    process's peak resident set size so far on CPU (a high-water mark, not per call)."""
    device = next(model.parameters()).device
    out: list = [None, "none"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            out[:] = [int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"]
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out[:] = [int(rss if sys.platform == "darwin" else rss * 1024), "cpu_max_rss"]


def summarise(costs: list[dict[str, Any]]) -> dict[str, float]:
    """Means over samples of the numeric cost fields (what a results row reports)."""
    keys = ("avg_visual_tokens", "tflops", "tflops_pdrop", "tflops_exact", "kv_bytes", "prefill_ms")
    out = {k: sum(c[k] for c in costs) / len(costs) for k in keys} if costs else {}
    peaks = [c["peak_memory_bytes"] for c in costs if c.get("peak_memory_bytes") is not None]
    if peaks:
        out["peak_memory_bytes"] = max(peaks)
    return out
