"""Data parallelism for ``vlm-reroute eval --processes N``: lmms-eval's own, under ``accelerate launch``.

lmms-eval shards each task's documents over the processes of a ``torch.distributed`` group (one rank per
GPU, or per CPU process with a gloo group) and merges the samples and scores on rank 0. The grid command
re-runs itself under ``accelerate launch --multi_gpu --num_processes N`` (``--multi_gpu`` starts
torchrun; without GPUs accelerate forms a gloo group on the CPU), every rank loads the model and answers
its shard, and rank 0 alone writes ``results.json``, the cells and the reports.

Every rank destroys the process group before its interpreter exits (:func:`close_group`, registered at
exit by the plugin model that joins the group): a gloo group left to interpreter teardown can abort the
rank with ``terminate called without an active exception`` (SIGABRT) after all its work is done, which
the launcher reports as a failed run (pytorch/pytorch#190489).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from collections.abc import Sequence


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process as the launcher set them (``(0, 1)`` when not launched)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def launched(processes: int) -> bool:
    """Whether this process is one of ``processes`` ranks started by a launcher (so: do not launch again)."""
    return world()[1] == processes


def free_port() -> int:
    """A TCP port free now on this machine, for the ranks' rendezvous (so parallel runs never collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(processes: int, args: Sequence[str], port: int | None = None) -> list[str]:
    """The command that runs ``python -m vlm_reroute ARGS`` as ``processes`` data-parallel ranks."""
    if processes < 2:
        raise ValueError(f"--processes {processes}: data parallelism needs at least 2 processes")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
    launcher += [str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(port or free_port())]
    return [*launcher, "-m", "vlm_reroute", *args]


def relaunch(processes: int, args: Sequence[str]) -> int:
    """Run ``vlm-reroute ARGS`` as ``processes`` ranks, output passed through; the launcher's exit status."""
    from .launch import run_streamed

    code, _ = run_streamed(launch_command(processes, args))
    return code


def group_up() -> bool:
    """Whether this process belongs to a ``torch.distributed`` default group now."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def close_group() -> None:
    """Destroy this process's ``torch.distributed`` default group, if one is up (a no-op otherwise).

    Local to the rank (no collective), so it is safe at exit whatever the other ranks are doing.
    """
    if group_up():
        import torch.distributed as dist

        dist.destroy_process_group()


def close_group_at_exit() -> None:
    """Run :func:`close_group` when the interpreter exits, while it is still whole (once per process).

    Only in a process that is one of several ranks: the launcher says so (``WORLD_SIZE`` > 1; lmms-eval's
    torchrun path may start the group later) or a group is up already.
    """
    if world()[1] > 1 or group_up():
        atexit.unregister(close_group)
        atexit.register(close_group)
