"""Data parallelism's plumbing (``vlm_reroute.eval.parallel``): the launch command and the group's end.

The two-rank runs themselves are tested end to end in test_eval_grid.py and test_eval_lmms.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vlm_reroute.eval.parallel import close_group, launch_command, world


def test_launch_command_runs_the_package_under_accelerate_on_a_given_port():
    cmd = launch_command(3, ["eval", "--limit", "2"], port=29511)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    assert cmd[cmd.index("--main_process_port") + 1] == "29511"
    assert cmd[-5:] == ["-m", "vlm_reroute", "eval", "--limit", "2"]


def test_launch_command_refuses_one_process():
    with pytest.raises(ValueError, match="--processes 1: data parallelism needs at least 2"):
        launch_command(1, ["eval"])


def test_world_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world() == (1, 2)


def test_close_group_without_a_group_does_nothing():
    import torch.distributed as dist

    assert not dist.is_initialized()
    close_group()
    assert not dist.is_initialized()


def test_the_group_is_destroyed_at_exit_while_the_interpreter_is_whole(tmp_path):
    """A gloo group left to interpreter teardown can abort a finished rank (SIGABRT); the handler that
    ``close_group_at_exit`` registers destroys it first, with one destroy call when registered twice."""
    script = textwrap.dedent(
        f"""
        import atexit
        import torch.distributed as dist
        from vlm_reroute.eval.parallel import close_group_at_exit

        calls = []
        destroy = dist.destroy_process_group
        dist.destroy_process_group = lambda *a, **k: (calls.append(1), destroy(*a, **k))
        # atexit runs last-registered first: this check runs after the package's handler
        atexit.register(lambda: print("at exit:", dist.is_initialized(), len(calls)))
        dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
        close_group_at_exit()
        close_group_at_exit()
        print("before exit:", dist.is_initialized(), len(calls))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines == ["before exit: True 0", "at exit: False 1"]  # (initialized, destroy calls)
