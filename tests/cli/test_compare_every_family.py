"""Issue 19's Done-means on every family's tiny checkpoint: ``vlm-reroute run --method sparsevlm --reroute
--compare``, ``--method dart`` and ``--method visionzip+pdrop`` time vanilla and the routed prefill, the
routed cache holds less KV than vanilla's, and the decisions reported are the schedule's. VisionZip is
given ``--set k=0.5`` (half of each image enters): its default lets 64 tokens in, more than a tiny
checkpoint's image has."""

from __future__ import annotations

import json

import pytest
from cli_support import assert_one_line_error
from PIL import Image
from typer.testing import CliRunner

from vlm_reroute.cli import app
from vlm_reroute.families import family_names
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint

runner = CliRunner()
METHODS = {"sparsevlm": [], "dart": [], "visionzip+pdrop": ["--set", "k=0.5"]}


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare_every_family") / "grey.png"
    Image.new("RGB", (280, 224), (120, 120, 120)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_every_family_models")
    return {family: save_tiny_checkpoint(family, root / family) for family in family_names()}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", family_names())
def test_run_compare(checkpoints, picture, family, method):
    result = runner.invoke(
        app,
        [
            "run", "--model", str(checkpoints[family]), "--image", str(picture), "--prompt", "What is it?",
            "--method", method, "--reroute", "--ratio", "0.5", *METHODS[method], "--compare",
            "--repeats", "2", "--warmup", "0", "--threads", "1", "--max-new-tokens", "2", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["prefill"]["runs_s"]) == len(report["vanilla"]["prefill"]["runs_s"]) == 2
    assert 0 < report["kv_bytes"] < report["vanilla"]["kv_bytes"]
    decided = [d["layer"] for d in report["decisions"]]
    assert decided == report["schedule"]["layers"] and decided
    assert "reroute=True" in report["method_spec"]


@pytest.mark.parametrize("method", [["visionzip", "--prune"], ["visionzip+reroute"]])
def test_set_reaches_the_method(checkpoints, picture, method):
    """``--set k=12`` lets exactly 12 tokens of the image into the language model (VisionZip alone:
    its pass-through decisions keep them all), in either spelling of the mode."""
    result = runner.invoke(
        app,
        [
            "run", "--model", str(checkpoints["llava"]), "--image", str(picture), "--prompt", "What is it?",
            "--method", *method, "--set", "k=12", "--max-new-tokens", "1", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "k=12" in report["method_spec"]
    assert [d["kept"] for d in report["decisions"]][0] == 12


@pytest.mark.parametrize(
    ("given", "fragments"),
    [
        (
            ["--set", "kk=3"],
            ("setting kk", "VisionZip has no such setting", "allowed: k, dominant, contextual"),
        ),
        (["--set", "k"], ("--set 'k'", "NAME=VALUE")),
        (["--set", "k=3", "--set", "k=4"], ("--set k", "given twice")),
        (["--set", "k=2.5"], ("VisionZip", "2.5")),
    ],
)
def test_bad_settings_are_one_line(checkpoints, picture, given, fragments):
    result = runner.invoke(
        app,
        [
            "run", "--model", str(checkpoints["llava"]), "--image", str(picture), "--prompt", "What is it?",
            "--method", "visionzip+pdrop", *given,
        ],
    )  # fmt: skip
    assert_one_line_error(result, *fragments)
