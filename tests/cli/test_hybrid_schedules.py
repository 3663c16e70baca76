"""The schedule a report names is the one the decisions were taken at, on a hybrid decoder (a tiny
Qwen3.5: decisions scored at full-attention layers only, 1, 3, 5, 7 of 8, or 2, 4, 6 scored by the
layer before). Binding moves the default layers there (``methods.base.fit_layers``); ``run --json``,
``run --compare``, ``explain --compare`` and the profiler used to resolve the schedule on the unbound
method: SparseVLM reported [1, 2, 4] while it decided at [2, 4, 6], and ``explain --compare`` fixed
the twins to unfitted layers, which the adapter refused."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from cli_support import assert_one_line_error
from PIL import Image
from typer.testing import CliRunner

from vlm_reroute.adapters import adapter_for
from vlm_reroute.bench.profiler import _input_facts, _theory
from vlm_reroute.budget.shapes import ModelShape
from vlm_reroute.cli import app
from vlm_reroute.methods import method_from_spec
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint
from vlm_reroute.testing.families import tiny_family_inputs, tiny_family_model
from vlm_reroute.testing.family_inputs import DEFAULT_IMAGES

runner = CliRunner()
#: spec, settings, the layers the decisions are taken at (fitted), the unfitted defaults of 8 layers
CASES = [
    ("sparsevlm", {"reroute": True}, [2, 4, 6], [1, 2, 4]),
    ("pdrop", {"reroute": False, "ratio": 0.5}, [1, 3, 5, 7], [1, 2, 4, 6]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_schedules")
    picture = root / "grey.png"
    Image.new("RGB", (280, 224), (120, 120, 120)).save(picture)
    return root, picture, save_tiny_checkpoint("qwen3_5", root / "qwen3_5")


def _cli(*args: str) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _options(spec: str, settings: dict) -> list[str]:
    out = ["--method", spec, "--reroute" if settings["reroute"] else "--prune"]
    return [*out, "--ratio", str(settings["ratio"])] if "ratio" in settings else out


@pytest.mark.parametrize(("spec", "settings", "fitted", "unfitted"), CASES)
def test_run_json_reports_the_layers_decided_at(files, spec, settings, fitted, unfitted):
    _, picture, ckpt = files
    report = _cli(
        "run", "--model", ckpt, "--image", picture, "--prompt", "What is it?", *_options(spec, settings),
        "--json", "--threads", "1", "--max-new-tokens", "1",
    )  # fmt: skip
    decided = [d["layer"] for d in report["decisions"]]
    assert decided == fitted != unfitted
    assert report["schedule"]["layers"] == decided
    # the counts reported are the counts kept (one image: its keep per decision)
    assert [d["kept"] + d["reentered"] for d in report["decisions"]] == report["schedule"]["keep"]


def test_run_compare_refuses_a_hybrid_decoder_in_one_line(files):
    """``--compare`` times the prefills with the profiler, which counts KV per layer and refuses a
    hybrid decoder's linear-attention layers; the refusal is one line, not a traceback. (A reachable
    budget: an unreachable one adds its warning line, once per process, so the test would depend on
    which tests ran before it.)"""
    _, picture, ckpt = files
    result = runner.invoke(
        app,
        [
            "run", "--model", str(ckpt), "--image", str(picture), "--prompt", "What is it?", "--method",
            "sparsevlm", "--ratio", "0.5", "--compare", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--max-new-tokens", "1",
        ],
    )  # fmt: skip
    assert_one_line_error(result, "profiling a hybrid decoder", "is not supported")


def test_bench_refuses_a_hybrid_decoder_in_one_line(files):
    """``bench`` uses the same profiler: one line, not a traceback."""
    _, picture, ckpt = files
    result = runner.invoke(
        app,
        [
            "bench", "--model", str(ckpt), "--image", str(picture), "--prompt", "What is it?", "--method",
            "fastv", "--ratio", "0.5", "--repeats", "1", "--warmup", "0", "--threads", "1",
        ],
    )  # fmt: skip
    assert_one_line_error(result, "profiling a hybrid decoder", "is not supported")


@pytest.mark.parametrize(("spec", "settings", "fitted", "unfitted"), CASES)
def test_explain_compare_solves_the_twins_on_the_fitted_layers(files, spec, settings, fitted, unfitted):
    root, picture, ckpt = files
    report = _cli(
        "explain", "--model", ckpt, "--image", picture, "--prompt", "What is it?", *_options(spec, settings),
        "--compare", "--json", "--dpi", "30", "--out", root / f"{spec}.png",
    )  # fmt: skip
    assert report["decision_layers"] == fitted
    decisions = report["samples"][0]["images"][0]["decisions"]
    assert len(decisions) == 2
    runs = list(decisions.values())
    assert [d["layer"] for d in runs[0]] == [d["layer"] for d in runs[1]] == fitted
    assert [d["kept"] + d["re-entered"] for d in runs[0]] == [d["kept"] + d["re-entered"] for d in runs[1]]


@cache
def _qwen3_5():
    model = tiny_family_model("qwen3_5")
    inputs = tiny_family_inputs("qwen3_5", sizes=(DEFAULT_IMAGES["qwen"][0],), questions=("Describe it.",))
    return model, inputs


@pytest.mark.parametrize(("spec", "settings", "fitted", "unfitted"), CASES)
def test_the_profiler_prices_the_layers_decided_at(spec, settings, fitted, unfitted):
    """The profiler's theory (``_theory``, its one schedule resolution) on the bound method. ``profile``
    itself refuses a hybrid decoder (its KV counts per layer), so the theory is called directly."""
    model, inputs = _qwen3_5()
    method = method_from_spec(spec, **settings)
    with method(model) as trace, torch.no_grad():
        model(**inputs)
    decided = [d.layer for d in trace.decisions]
    assert decided == fitted
    shape = ModelShape.from_config(model.config)
    layers, keep, budget = _theory(shape, _input_facts(model, inputs), method, adapter_for(model))
    assert layers == decided
    assert keep == [int(d.selected[0].numel()) for d in trace.decisions]  # one image: its counts
    assert budget is not None and budget.layers == tuple(decided)
    assert [row.visual_tokens for row in budget.rows] == trace.tokens_per_layer(8)
