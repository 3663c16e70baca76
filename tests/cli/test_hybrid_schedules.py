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


def test_bench_profiles_a_hybrid_decoder(files):
    """``bench`` with the ideal router on Qwen3.5: KV lengths are ``None`` at the linear-attention
    layers and the attention layers' sum matches the theory; no FLOPs theory (its formulas would
    price softmax attention in the linear layers)."""
    _, picture, ckpt = files
    rows = _cli(
        "bench", "--model", ckpt, "--image", picture, "--prompt", "What is it?", "--method", "fastv",
        "--ratio", "0.5", "--repeats", "1", "--warmup", "0", "--threads", "1", "--ideal", "--json",
    )["rows"]  # fmt: skip
    linear = [i for i in range(8) if (i + 1) % 2]  # the tiny Qwen3.5: full attention at 1, 3, 5, 7
    for row in rows:
        assert [row["kv_lengths"][i] is None for i in range(8)] == [i in linear for i in range(8)]
        assert row["kv_tokens"] == row["kv_tokens_theory"] == sum(n for n in row["kv_lengths"] if n)
        assert row["theoretical_speedup"] is None and row["ideal_prefill_s"] > 0
    assert rows[1]["kv_tokens"] < rows[0]["kv_tokens"]


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
    """The profiler's theory (``_theory``, its one schedule resolution) on the bound method."""
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
