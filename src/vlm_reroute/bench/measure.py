"""Process-level measurements for the profiler: synchronisation, memory high-water marks, machine facts.

Peak memory is the kernel's RSS high-water mark (``VmHWM``), restarted before each measured
prefill, so it counts everything the process touches (weights, activations, allocator slack)
and not only what torch reports; on CUDA ``max_memory_allocated`` is added.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

__all__ = ["MemoryStats", "environment", "prefill_memory", "sync"]


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class MemoryStats:
    """Process memory around one prefill: RSS before, its high-water mark during, CUDA peak.

    Attributes
    ----------
    rss_before_bytes : int
        Resident set size before the prefill.
    peak_rss_bytes : int
        The kernel's RSS high-water mark (``VmHWM``) during it, restarted just before (where the
        mark cannot be reset: ``ru_maxrss``, the process's lifetime peak).
    cuda_peak_bytes : int or None
        ``torch.cuda.max_memory_allocated`` on CUDA, else ``None``.
    """

    rss_before_bytes: int
    peak_rss_bytes: int
    cuda_peak_bytes: int | None

    @property
    def increase_bytes(self) -> int:
        return self.peak_rss_bytes - self.rss_before_bytes


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            found = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    """Give freed heap back to the OS and restart the RSS high-water mark (Linux only).

    Without ``malloc_trim``, memory glibc kept from an earlier run would absorb the next run's
    allocations and hide its peak; without the reset the mark is the whole process's lifetime peak.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except (OSError, AttributeError):
        return False
    return True


def prefill_memory(model: nn.Module, run: Callable[[], Any]) -> MemoryStats:
    """Memory of ``run()`` (one prefill). For independent high-water marks call it in a fresh process.

    Falls back to ``ru_maxrss`` (the lifetime peak) where the mark cannot be reset.
    """
    device = next(model.parameters()).device
    reset = _reset_peak_rss()
    before = (_status_kib("VmRSS") or 0) * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run()
    sync(device)
    hwm = _status_kib("VmHWM") if reset else None
    peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return MemoryStats(before, peak, cuda)


def environment() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            found = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.MULTILINE)
        if found is not None:
            cpu = found.group(1)
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # vs cpu_count
    }
