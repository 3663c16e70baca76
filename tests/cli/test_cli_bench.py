"""``vlm-reroute bench``: warm-up, interleaved repeats, medians and quartiles of every time, speedups
as ratios of medians, the threads in the header, a warning when times spread too wide."""

from __future__ import annotations

import json
from dataclasses import replace
from statistics import median, quantiles

import pytest
import torch
from cli_support import assert_one_line_error, invoke, saved_checkpoints, saved_images
from conftest import model_for

from vlm_reroute import PDrop
from vlm_reroute.bench.profiler import profile
from vlm_reroute.bench.stats import ratio, spread
from vlm_reroute.testing.models import tiny_inputs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return saved_images(tmp_path_factory)


def test_bench_reports_one_statistic_and_writes_json_and_plots(checkpoints, images, tmp_path):
    out = tmp_path / "report.json"
    result = invoke(
        "bench", "--model", checkpoints["llava"], "--image", images["big"], "--method", "pdrop",
        "--ratio", "0.25", "--repeats", "3", "--warmup", "1", "--decode-tokens", "1", "--ideal",
        "--threads", "1", "--output", out, "--plots", tmp_path / "plots",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "1 thread (--threads)" in text and "median (q1–q3) of 3 interleaved runs after 1 warm-up" in text
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["vanilla", "PDrop", "PDrop + Reroute"]
    assert data["environment"]["torch_threads"] == 1 and data["settings"]["budget"] == {"ratio": 0.25}
    vanilla = data["rows"][0]
    for row in data["rows"]:
        runs = row["prefill_runs_s"]
        assert len(runs) == 3 and row["prefill_s"] == pytest.approx(median(runs))
        assert row["prefill_iqr_s"] == pytest.approx(quantiles(runs, n=4, method="inclusive")[::2])
        # the speedup is the ratio of the medians shown beside it, its range from the quartiles
        assert row["speedup"] == pytest.approx(vanilla["prefill_s"] / row["prefill_s"])
        assert row["speedup_range"] == pytest.approx(
            [
                vanilla["prefill_iqr_s"][0] / row["prefill_iqr_s"][1],
                vanilla["prefill_iqr_s"][1] / row["prefill_iqr_s"][0],
            ]
        )
        assert row["ideal_speedup"] == pytest.approx(vanilla["prefill_s"] / row["ideal_prefill_s"])
        assert row["ideal_fraction"] == pytest.approx(row["ideal_prefill_s"] / row["prefill_s"])
        assert row["decode_s_per_token"] == pytest.approx(median(row["decode_runs_s_per_token"]))
        assert f"{row['prefill_s'] * 1e3:.1f} ({row['prefill_iqr_s'][0] * 1e3:.1f}–" in text
    for row in data["rows"][1:]:
        assert abs(row["avg_visual_tokens"] - 0.25 * 576) <= 0.5
    for png in ("tokens_per_layer.png", "speedup.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_flag_prints_the_report_on_stdout(checkpoints, images):
    result = invoke(
        "bench", "--model", checkpoints["qwen2_vl"], "--image", images["small"], "--method", "fastv",
        "--tier", "20", "--repeats", "1", "--warmup", "0", "--decode-tokens", "0", "--threads", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["rows"]] == ["vanilla", "FastV", "FastV + Reroute"]
    assert data["rows"][1]["prefill_iqr_s"] == [data["rows"][1]["prefill_s"]] * 2  # one run: no spread


def test_spread_statistics_and_the_wide_spread_warning():
    steady, noisy = spread([10.0, 10.1, 10.2, 10.0, 10.1]), spread([10.0, 14.0, 10.0, 20.0, 11.0])
    assert (steady.median, steady.q1, steady.q3) == (10.1, 10.0, 10.1)
    assert not steady.wide and noisy.wide and noisy.relative == pytest.approx((14 - 10) / 11)
    r = ratio(spread([20.0, 22.0, 24.0]), spread([10.0, 10.0, 12.0]))
    assert (r.value, r.low, r.high) == pytest.approx((2.2, 21 / 11, 23 / 10))
    assert spread([5.0]).text(1, ".1f") == "5.0 (single run)"
    model = model_for("llava")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared machine; the times are replaced below anyway
    try:
        report = profile(model, tiny_inputs(model, (20,)), {"PDrop": PDrop([1, 2], [0.5, 0.25])},
                     repeats=1, warmup=0, decode_tokens=0, memory=False, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert report.spread_warning() is None  # a single run has no spread
    runs = {"vanilla": [1.0, 1.01, 1.02, 1.0, 1.01], "PDrop": [0.5, 0.9, 0.5, 0.52, 0.8]}
    report.rows = [replace(row, prefill_runs_s=runs[row.name]) for row in report.rows]
    report.environment["torch_threads"] = 2
    message = report.spread_warning()
    assert message is not None and "PDrop 58%" in message and "vanilla" not in message
    assert "--threads 1" in message
    report.environment["torch_threads"] = 1  # already one thread: no such advice
    assert "PDrop 58%" in report.spread_warning() and "--threads" not in report.spread_warning()


def test_bench_errors_are_one_line(checkpoints, images, tmp_path):
    llava = checkpoints["llava"]
    assert_one_line_error(invoke("bench", "--model", llava), "give --image")
    assert_one_line_error(
        invoke("bench", "--model", llava, "--image", images["big"], "--method", "x"), "unknown method 'x'"
    )
    (tmp_path / "file").write_text("")
    plots = invoke("bench", "--model", llava, "--image", images["big"], "--plots", tmp_path / "file" / "p")
    assert_one_line_error(plots, "--plots", "cannot create the folder")
