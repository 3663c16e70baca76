"""The profiler measures what it says: KV cache held == theory, documented JSON, plots, ideal times.

Behaviour only (no speed claims): tiny 8-layer models, one repeat, no warm-up.
"""

from __future__ import annotations

import json
from statistics import median

import pytest
import torch
from conftest import model_for

from vlm_reroute import FastV, PDrop
from vlm_reroute.bench.ideal import LayerTimer, SpanTimer, layer_times
from vlm_reroute.bench.plots import speedup_png, tokens_per_layer_png
from vlm_reroute.bench.profiler import ProfileRow, profile
from vlm_reroute.testing.models import tiny_inputs

METHODS = {
    "FastV": FastV(layer=3, keep=0.25),
    "FastV + Reroute": PDrop(layers=[3, 5], keep=[144, 144], reroute=True),
    "PDrop": PDrop(layers=[1, 2, 4, 6], keep=[96, 64, 32, 16]),
    "PDrop + Reroute": PDrop(layers=[1, 2, 4, 6], keep=[16, 16, 8, 4], reroute=True),
}
ROW_KEYS = {
    "name", "method", "reroute", "layers", "keep", "prefill_s", "prefill_iqr_s", "prefill_runs_s", "speedup",
    "speedup_range", "decode_s_per_token", "decode_iqr_s_per_token", "decode_runs_s_per_token",
    "peak_rss_bytes", "peak_rss_increase_bytes", "cuda_peak_bytes", "kv_lengths",
    "kv_tokens", "kv_bytes", "kv_tokens_theory", "kv_bytes_theory", "visual_tokens_per_layer", "reentered",
    "avg_visual_tokens", "flops_ratio", "flops_ratio_pdrop", "theoretical_speedup", "efficiency",
    "ideal_prefill_s", "ideal_iqr_s", "ideal_runs_s", "ideal_layer_s", "ideal_speedup", "ideal_speedup_range",
    "ideal_fraction", "ideal_fraction_range",
}  # fmt: skip
TOP_KEYS = {"rows", "model", "inputs", "settings", "environment", "outside_decoder_s"}


def quick(model, inputs, methods=METHODS, **kwargs):
    options = dict(repeats=1, warmup=0, decode_tokens=0, progress=False, memory=False)
    return profile(model, inputs, methods, **{**options, **kwargs})


def test_kv_cache_held_equals_theory(family):
    model = model_for(family)
    report = quick(model, tiny_inputs(model, (20,)))
    assert [r.name for r in report.rows] == ["vanilla", *METHODS]
    n = report.inputs["seq_len"]
    assert report.row("vanilla").kv_lengths == [n] * 8
    for row in report.rows:
        assert row.kv_tokens == row.kv_tokens_theory == sum(row.kv_lengths)
        assert row.kv_bytes == row.kv_bytes_theory
    pdrop = report.row("PDrop + Reroute")
    text = report.inputs["text_tokens"]
    assert pdrop.kv_lengths == [n] + [text + 16] * 3 + [text + 8] * 2 + [text + 4] * 2
    assert pdrop.visual_tokens_per_layer == [576, 16, 16, 16, 8, 8, 4, 4]
    assert report.row("FastV").keep == [144] and report.row("PDrop").flops_ratio < 1


def test_kv_bytes_use_the_models_dtype():
    model = model_for("qwen2_5_vl", dtype=torch.bfloat16)  # 4 layers, hidden 32
    methods = {
        "PDrop": PDrop(layers=[1, 2], keep=[0.5, 0.25]),
        "PDrop + Reroute": PDrop([1, 2], [0.25, 0.25], True),
    }
    report = quick(model, tiny_inputs(model, (20,)), methods)
    for row in report.rows:
        assert (
            row.kv_bytes == row.kv_bytes_theory == row.kv_tokens * 2 * 1 * 16 * 2
        )  # K+V, 1 KV head of 16, bf16
    assert report.model["dtype"] == "bfloat16"


def test_batch_theory_scales_and_padding_has_none():
    model = model_for("llava")
    same = quick(model, tiny_inputs(model, (20, 20)), {"PDrop": METHODS["PDrop"]})
    assert all(r.kv_tokens == r.kv_tokens_theory for r in same.rows)
    assert same.row("PDrop").kv_tokens_theory == 2 * (8 * 25 + 576 + 96 + 2 * 64 + 2 * 32 + 2 * 16)
    padded = quick(model, tiny_inputs(model, (20, 12)), {"PDrop": METHODS["PDrop"]})
    assert padded.inputs["padded"] and padded.row("PDrop").kv_tokens_theory is None


def test_report_json_has_the_documented_keys_and_all_measurements():
    model = model_for("qwen2_5_vl")
    report = quick(model, tiny_inputs(model, (20,)), decode_tokens=2, memory=True, ideal=True)
    data = json.loads(report.to_json())
    assert set(data) == TOP_KEYS
    assert {f for f in ProfileRow.__dataclass_fields__} == ROW_KEYS
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert row["prefill_s"] > 0 and row["decode_s_per_token"] > 0
        assert row["peak_rss_bytes"] > row["peak_rss_increase_bytes"] >= 0
        assert row["ideal_prefill_s"] > 0 and row["theoretical_speedup"] >= 1
    assert {"batch", "seq_len", "visual_tokens", "text_tokens", "images"} <= set(data["inputs"])
    assert data["model"]["shape"]["num_layers"] == 8 and data["outside_decoder_s"] > 0
    assert data["rows"][0]["speedup"] == 1.0
    assert report.table().row_count == len(METHODS) + 1


def test_ideal_layer_times_are_positive_for_each_token_count(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    times = layer_times(model, inputs, [601, 120, 25], repeats=1)
    assert set(times) == {601, 120, 25} and all(t > 0 for t in times.values())
    timer = LayerTimer(model)
    timer.capture(model, inputs, use_cache=True)
    per_layer = timer.time_pass([timer.max_tokens, 100, 100, 60, 60, 30, 30, 30])
    assert len(per_layer) == 8 and all(t > 0 for t in per_layer)
    hidden, kwargs = timer.inputs_for(60)
    assert hidden.shape[1] == 60 and kwargs["position_embeddings"][0].shape[-2] == 60
    with pytest.raises(ValueError, match="tokens"):
        timer.inputs_for(timer.max_tokens + 1)


def test_ideal_rows_cover_every_layer():
    model = model_for("llava")
    report = quick(
        model, tiny_inputs(model, (20,)), {"PDrop + Reroute": METHODS["PDrop + Reroute"]}, ideal=True
    )
    for row in report.rows:
        assert len(row.ideal_layer_s) == 8 and all(t > 0 for t in row.ideal_layer_s)


def test_ideal_times_are_built_from_the_routed_token_counts(monkeypatch):
    # a fake layer timer (1 ms per token) and a zero decoder span make every ideal number known in
    # advance: ideal run r = the vanilla run r (all outside the decoder) + 1 ms × Σ tokens per layer
    monkeypatch.setattr(LayerTimer, "time_pass", lambda self, counts: [1e-3 * n for n in counts])
    monkeypatch.setattr(SpanTimer, "span", property(lambda self: 0.0))
    model = model_for("llava")
    report = quick(
        model,
        tiny_inputs(model, (20,)),
        {"PDrop + Reroute": METHODS["PDrop + Reroute"]},
        ideal=True,
        repeats=3,
    )
    n, text = report.inputs["seq_len"], report.inputs["text_tokens"]
    tokens = {
        "vanilla": [n] * 8,
        "PDrop + Reroute": [n] + [text + 16] * 3 + [text + 8] * 2 + [text + 4] * 2,
    }
    vanilla_runs = report.row("vanilla").prefill_runs_s
    assert len(vanilla_runs) == 3 and report.outside_decoder_s == pytest.approx(median(vanilla_runs))
    for row in report.rows:
        assert row.ideal_layer_s == pytest.approx([1e-3 * k for k in tokens[row.name]])
        runs = [v + 1e-3 * sum(tokens[row.name]) for v in vanilla_runs]
        assert row.ideal_runs_s == pytest.approx(runs)
        assert row.ideal_prefill_s == pytest.approx(median(runs))
        assert row.ideal_fraction == pytest.approx(median(runs) / median(row.prefill_runs_s))
        assert row.ideal_speedup == pytest.approx(median(vanilla_runs) / median(runs))


def test_plots_are_valid_pngs(tmp_path):
    model = model_for("llava")
    report = quick(model, tiny_inputs(model, (20,)), ideal=True)
    for plot, name in ((tokens_per_layer_png, "tokens.png"), (speedup_png, "speedup.png")):
        path = plot(report, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    again = tokens_per_layer_png(json.loads(report.to_json()), tmp_path / "from_json.png")
    assert again.exists()


def test_vanilla_is_reserved():
    model = model_for("llava")
    with pytest.raises(ValueError, match="vanilla"):
        quick(model, tiny_inputs(model, (20,)), {"vanilla": METHODS["PDrop"]})


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_5"])
def test_ideal_passes_run_each_layer_on_what_it_ran_routed(family):
    """The lengths the ideal passes use (each layer's input under the method, recorded by hooks) equal
    the KV lengths wherever a layer caches keys; a hybrid decoder's linear-attention layers (no KV)
    get their stage's length (the tiny Qwen3.5: full attention at the odd layers)."""
    from vlm_reroute.bench.rounds import RoundSettings, run_rounds
    from vlm_reroute.methods import method_from_spec
    from vlm_reroute.testing.families import tiny_family_inputs, tiny_family_model
    from vlm_reroute.testing.family_inputs import DEFAULT_IMAGES

    if family == "qwen3_5":
        model = tiny_family_model(family)
        inputs = tiny_family_inputs(family, sizes=(DEFAULT_IMAGES["qwen"][0],), questions=("Describe it.",))
    else:
        model = model_for(family)
        inputs = tiny_inputs(model, (20,))
    configs = {
        "vanilla": None,
        "pdrop": method_from_spec("pdrop", reroute=True, ratio=0.5),
        "dart": method_from_spec("dart", ratio=0.5),
    }
    settings = RoundSettings.checked(1, 0, 0, None, ideal=True, memory=False)
    measured = run_rounds(model, inputs, configs, settings, progress=False)
    for name in configs:
        lengths, kv = measured.layer_tokens[name], measured.kv_lengths[name]
        assert all(n == k for n, k in zip(lengths, kv, strict=True) if k is not None), name
        if family == "qwen3_5":
            assert [k is None for k in kv] == [j % 2 == 0 for j in range(len(kv))]
            # decisions scored at their own layer fall on attention layers: each linear layer after
            # the first runs in the stage of the attention layer before it
            assert all(lengths[j] == lengths[j - 1] for j in range(2, len(kv), 2)), name
    assert measured.layer_tokens["pdrop"][-1] < measured.layer_tokens["vanilla"][-1]
