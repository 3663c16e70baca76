"""The command line, offline: budget arithmetic and a real load of tiny checkpoints saved with
``save_pretrained`` into the test's temp dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_reroute.cli import app
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_budget_json_has_every_method_and_hits_the_tier():
    result = invoke("budget", "--model", "llava-1.5-7b", "--tier", "64", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["method"] for r in rows] == ["vanilla", "FastV", "FastV + Reroute", "PDrop", "PDrop + Reroute"]
    for row in rows:
        assert {
            "method",
            "reroute",
            "layers",
            "keep",
            "avg_visual_tokens",
            "tflops",
            "tflops_exact",
            "kv_bytes",
        } <= set(row)
    assert rows[0]["avg_visual_tokens"] == 576
    for row in rows[1:]:
        assert abs(row["avg_visual_tokens"] - 64) <= 0.5
        assert row["reroute"] == row["method"].endswith("Reroute")
        assert row["tflops"] < rows[0]["tflops"] and row["kv_bytes"] < rows[0]["kv_bytes"]
    fastv, fastv_rr = rows[1], rows[2]
    assert fastv["layers"] == [3] and fastv_rr["layers"] == [3, 7, 15, 23]
    assert len(set(fastv_rr["keep"])) == 1  # FastV + Reroute: FastV's count at every re-decision
    pdrop_rr = rows[4]
    a = pdrop_rr["keep"][0]
    assert (
        pdrop_rr["keep"][1] == a
        and abs(pdrop_rr["keep"][2] - a / 2) <= 1
        and abs(pdrop_rr["keep"][3] - a / 4) <= 1
    )


def test_budget_table_and_clear_errors():
    result = invoke("budget", "--model", "qwen2.5-vl-7b", "--tier", "128")
    assert result.exit_code == 0 and "PDrop" in result.output and "Reroute" in result.output
    bad = invoke("budget", "--model", "llava-9b")
    assert bad.exit_code == 1 and "unknown model 'llava-9b'" in bad.output and "Traceback" not in bad.output
    unreachable = invoke("budget", "--model", "llava-1.5-7b", "--tier", "1")
    assert unreachable.exit_code == 1 and "not reachable" in unreachable.output


def test_budget_is_fast_and_needs_no_torch():
    code = "import sys; from vlm_reroute.cli import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    image = root / "street.png"
    Image.new("RGB", (500, 400), (200, 40, 40)).save(image)
    return {f: save_tiny_checkpoint(f, root / f) for f in ("llava", "qwen2_vl")}, image


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_run_on_a_saved_checkpoint(checkpoints, family):
    paths, image = checkpoints
    result = invoke(
        "run", "--model", str(paths[family]), "--image", str(image), "--prompt", "Where is the red box?",
        "--tier", "128", "--compare", "--max-new-tokens", "3", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["method"] == "PDrop + Reroute"
    assert [d["layer"] for d in report["decisions"]] == report["schedule"]["layers"]
    n = report["visual_tokens"]
    layers, keep = report["schedule"]["layers"], report["schedule"]["keep"]
    widths = [b - a for a, b in zip(layers, [*layers[1:], 8], strict=True)]
    avg_t = (layers[0] * n + sum(k * w for k, w in zip(keep, widths, strict=True))) / 8
    assert abs(avg_t - 128) <= 0.5
    assert report["kv_bytes"] < report["vanilla"]["kv_bytes"]
    assert isinstance(report["answer"], str) and isinstance(report["vanilla"]["answer"], str)


def test_run_errors_are_one_line(checkpoints, tmp_path):
    paths, image = checkpoints
    missing = invoke(
        "run", "--model", str(paths["llava"]), "--image", str(tmp_path / "no.png"), "--prompt", "x"
    )
    assert missing.exit_code == 1 and "image file not found" in missing.output
    nowhere = invoke("run", "--model", str(tmp_path / "absent"), "--image", str(image), "--prompt", "x")
    assert nowhere.exit_code == 1 and "cannot load" in nowhere.output
    tier = invoke(
        "run", "--model", str(paths["llava"]), "--image", str(image), "--prompt", "x", "--tier", "2"
    )
    assert tier.exit_code == 1 and "not reachable" in tier.output
    for result in (missing, nowhere, tier):
        assert "Traceback" not in result.output


def test_bench_writes_json_and_plots(checkpoints, tmp_path):
    paths, image = checkpoints
    out = tmp_path / "report.json"
    result = invoke(
        "bench", "--model", str(paths["llava"]), "--image", str(image), "--tier", "128", "--repeats", "1",
        "--warmup", "0", "--decode-tokens", "1", "--json", str(out), "--plots", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert json.dumps(report).count("PDrop + Reroute") >= 1
    for png in ("tokens_per_layer.png", "speedup.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
