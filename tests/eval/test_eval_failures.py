"""A failed lmms-eval run is an error, never a silent exit 0; a clamped budget is a warning, never silent.

lmms-eval 0.7 logs an evaluation's exception and exits 0 without results, and turns every Python
warning off when it is imported. ``vlm-reroute eval`` and ``python -m vlm_reroute.eval`` make a failed
run one ``error:`` line with exit status 1; the plugin reports an unreachable budget once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cli_support import SUBPROCESS_TIMEOUT_S
from typer.testing import CliRunner

from vlm_reroute.eval.failures import describe_log
from vlm_reroute.eval.generation import reported_clamps
from vlm_reroute.eval.launch import failure, is_evaluation, option
from vlm_reroute.methods import method_names

ROOT = Path(__file__).resolve().parents[2]

# lmms-eval 0.7.3's log of a run under filelock 4 and of an unknown task (ANSI colours as printed)
FILELOCK_LOG = (
    "\x1b[32m2026-12-02 16:16:51\x1b[0m | \x1b[31m\x1b[1mERROR   \x1b[0m | "
    "lmms_eval.__main__:cli_evaluate:614 - "
    "\x1b[31m\x1b[1mError during evaluation: No module named 'filelock._api'. Please set "
    "`--verbosity=DEBUG` to get more information.\x1b[0m\n"
    'Traceback (most recent call last):\n  File "lmms_eval/evaluator.py", line 134\n'
    "ModuleNotFoundError: No module named 'filelock._api'\n"
)
UNKNOWN_LOG = (
    "ERROR | lmms_eval.__main__:cli_evaluate:614 - Error during evaluation: Tasks not found: tiny_popo, foo. "
    "Try `lmms-eval --tasks {list_groups,list_subtasks,list_tags,list}` to list out all available names. "
    "Please set `--verbosity=DEBUG` to get more information.\nValueError: Tasks not found: tiny_popo, foo.\n"
)


# ------------------------------------------------------------------------------------- filelock
def test_eval_extra_pins_a_filelock_lmms_eval_can_patch():
    """lmms-eval 0.7.3 patches ``filelock._api.FileLockMeta`` (3.16+), a module filelock 4 removed."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["eval"]
    pins = [Requirement(r) for r in extra if Requirement(r).name == "filelock"]
    assert len(pins) == 1
    assert not pins[0].specifier.contains("4.0.0") and pins[0].specifier.contains("3.32.7")
    assert not pins[0].specifier.contains("3.15.4")  # no FileLockMeta before 3.16
    pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    from importlib.metadata import version

    import filelock._api  # what lmms_eval.evaluator._enable_reentrant_filelocks imports

    assert hasattr(filelock._api, "FileLockMeta")
    assert pins[0].specifier.contains(version("filelock"))


# ------------------------------------------------------------------------ reading lmms-eval's log
def test_the_log_of_a_failed_run_becomes_one_line():
    assert describe_log(FILELOCK_LOG) == (
        "No module named 'filelock._api' (lmms-eval 0.7.3 needs filelock<4; pip install "
        "'filelock>=3.16,<4' (the eval extra pins it))"
    )
    unknown = describe_log(UNKNOWN_LOG)
    assert unknown.startswith("unknown lmms-eval task tiny_popo, foo; list the task names with ")
    assert "`python -m lmms_eval --tasks list`" in unknown and "need --include_path " in unknown
    assert describe_log("Traceback ...\nRuntimeError: boom\n") == "RuntimeError: boom"
    assert describe_log("all fine\n") is None


def test_a_run_without_new_results_is_a_failure(tmp_path):
    args = ["--model", "vlm_reroute", "--tasks=pope", "--output_path", str(tmp_path)]
    assert option(args, "--tasks") == "pope" and option(args, "--output_path") == str(tmp_path)
    assert is_evaluation(args) and not is_evaluation(["--tasks", "list"]) and not is_evaluation(["-h"])
    # exit status 0 and a clean log, but nothing written: failed
    assert failure(args, 0, "done\n", set()).startswith(f"lmms-eval wrote no results to {tmp_path}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "20261202_results.json").write_text("{}")
    assert failure(args, 0, "done\n", set()) is None
    assert failure(args, 0, FILELOCK_LOG, set()).startswith("No module named 'filelock._api'")
    assert failure(["--model", "x", "--tasks", "pope"], 0, "|Tasks|\n", set()) is None  # no output_path


# ----------------------------------------------------------------------------- clamped budgets
def test_clamped_budgets_are_reported_once_even_with_warnings_turned_off():
    from vlm_reroute.budget.solver import solve_for_target
    from vlm_reroute.budget.target import BudgetTarget

    reported: list[str] = []
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("ignore")  # what importing lmms-eval does
        with reported_clamps(reported.append, set()):
            for _ in range(2):
                solve_for_target.cache_clear()  # each call warns again
                solve_for_target(8, 576, "fastv", False, BudgetTarget(avg_t=64.0))
        warnings.simplefilter("always")
        with reported_clamps(reported.append, set()):
            warnings.warn("someone else's", UserWarning, stacklevel=1)
    assert len(reported) == 1 and "using avg_T=72.88" in reported[0] and "\n" not in reported[0]
    assert [str(w.message) for w in outer] == ["someone else's"]  # other warnings pass through


# --------------------------------------------------------------- end to end (needs the eval extra)
pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from eval_helpers import shared_workspace

    return shared_workspace(tmp_path_factory)


def _launch(ws, out: Path, model_args: str, task: str = "tiny_pope") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    args = ["--model", "vlm_reroute", "--model_args", f"pretrained={ws['llava']},{model_args}",
            "--tasks", task, "--include_path", str(ws["tasks"]), "--device", "cpu", "--batch_size", "2",
            "--output_path", str(out)]  # fmt: skip
    command = [sys.executable, "-m", "vlm_reroute.eval", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_python_m_vlm_reroute_eval_turns_a_failed_run_into_status_1(ws, tmp_path):
    unknown = _launch(ws, tmp_path, "method=fastv,tier=64", task="tiny_popo")
    assert unknown.returncode == 1, unknown.stderr[-2000:]
    assert _errors(unknown.stderr) == [unknown.stderr.strip().splitlines()[-1]]
    assert _errors(unknown.stderr)[0].startswith("error: unknown lmms-eval task tiny_popo; list the task")
    # the model cannot be built: lmms-eval logs it and exits 0
    broken = _launch(ws, tmp_path, "method=fastvv")
    assert broken.returncode == 1 and "Error during evaluation" in broken.stdout
    allowed = ", ".join(method_names())
    assert _errors(broken.stderr) == [f"error: method='fastvv': allowed are none, {allowed}"]
    assert not list(tmp_path.rglob("*_results.json"))


def test_the_plugin_reports_an_unreachable_tier_once(ws, tmp_path):
    """tier=64 on an 8-layer LLaVA runs FastV at avg_T 72.875: said once in lmms-eval's log."""
    run = _launch(ws, tmp_path, "method=fastv,tier=64,max_new_tokens=4")
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    log = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)
    said = [line for line in log.splitlines() if "target avg_T=64 is not reachable for FastV" in line]
    assert len(said) == 1 and "WARNING" in said[0] and "using avg_T=72.88" in said[0]
    assert len(list(tmp_path.rglob("*_results.json"))) == 1 and not _errors(run.stderr)


def _grid(ws, out, *extra, tasks="tiny_pope"):
    from vlm_reroute.cli import app

    args = ["eval", "--model", str(ws["llava"]), "--tasks", tasks, "--out", str(out),
            "--include-path", str(ws["tasks"]), "--methods", "fastv", "--reroute", "off", "--device", "cpu",
            "--batch-size", "2", "--max-new-tokens", "4", "--limit", "2", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_grid_refuses_an_unknown_task_before_loading_the_model(ws, tmp_path, monkeypatch):
    from vlm_reroute.eval import model as plugin

    built = []
    monkeypatch.setattr(plugin.VlmReroute, "__init__", lambda self, **kw: built.append(kw))
    result = _grid(ws, tmp_path / "grid", "--tiers", "64", tasks="tiny_pope,tiny_popo")
    assert result.exit_code == 1 and built == []
    assert _errors(result.output) == [result.output.strip()]
    assert result.output.startswith("error: unknown lmms-eval task tiny_popo (did you mean tiny_pope?); list")


def test_grid_turns_an_lmms_eval_failure_into_one_line(ws, tmp_path, monkeypatch):
    """filelock 4 under lmms-eval 0.7.3: simple_evaluate raises; one line with the fix, no traceback."""
    from lmms_eval import evaluator

    def filelock_4() -> None:
        raise ModuleNotFoundError("No module named 'filelock._api'")

    monkeypatch.setattr(evaluator, "_enable_reentrant_filelocks", filelock_4)
    out = tmp_path / "grid"
    result = _grid(ws, out, "--tiers", "64")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert _errors(result.output) == [result.output.strip().splitlines()[-1]]
    line = _errors(result.output)[0]
    assert line.startswith(
        "error: tiny_pope, vanilla: lmms-eval failed: ModuleNotFoundError: No module named"
    )
    assert "pip install 'filelock>=3.16,<4'" in line and "(at " in line
    assert not (out / "results.json").exists()


def test_grid_warns_once_when_a_tier_is_clamped(ws, tmp_path):
    from vlm_reroute.budget.solver import solve_for_target

    solve_for_target.cache_clear()  # another test may have solved this target (the solver warns once)
    result = _grid(ws, tmp_path / "grid", "--tiers", "64")
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "not reachable" in line]
    assert len(said) == 1 and said[0].startswith("warning: target avg_T=64 is not reachable for FastV")
