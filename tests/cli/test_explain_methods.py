"""``vlm-reroute explain`` for the newer methods (SparseVLM, DART, DivPrune, VisionZip + PDrop), prune and
reroute, on saved tiny LLaVA-1.5 and Qwen2.5-VL checkpoints: the picture is written and the counts drawn
per decision are the schedule the method resolves to for that image."""

from __future__ import annotations

import json
from functools import cache

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_reroute.adapters import adapter_for
from vlm_reroute.budget.shapes import ModelShape
from vlm_reroute.cli import app
from vlm_reroute.loading import load_model
from vlm_reroute.methods import MethodSpec
from vlm_reroute.methods.spec import DEFAULT_RATIO
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint

runner = CliRunner()
METHODS = ["sparsevlm", "dart", "divprune", "visionzip+pdrop"]
FAMILIES = {"llava": {"image_size": 112}, "qwen2_5_vl": {}}  # LLaVA: 8×8 = 64 tokens per image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_methods")
    picture = root / "grey.png"
    # Qwen2.5-VL: 280×224 -> 10×8 = 80 merged cells, above VisionZip's default 64 entering tokens
    Image.new("RGB", (280, 224), (120, 120, 120)).save(picture)
    return root, picture, {f: save_tiny_checkpoint(f, root / f, **kw) for f, kw in FAMILIES.items()}


@cache
def _model(path: str):
    return load_model(path, dtype="float32", device="cpu")


def expected_counts(path: str, method: str, reroute: bool, n: int) -> tuple[list[int], list[int], int]:
    """Decision layers, tokens each decision lets through, and tokens entering the language model, as
    the method built with explain's default budget resolves them for an image of ``n`` tokens."""
    model = _model(path)
    built = MethodSpec.from_options(method, reroute, ratio=DEFAULT_RATIO).build(model)
    assert built is not None
    schedule = built.bind(adapter_for(model)).resolve(ModelShape.from_config(model.config), n)
    layers, counts = list(schedule.layers), [int(k) for k in schedule.keep]  # resolved: counts
    if schedule.entry is None:
        return layers, counts, n
    entry = int(schedule.entry)
    return [0, *layers], [entry, *counts], entry


def explain(*args):
    result = runner.invoke(app, ["explain", *map(str, args)])
    return result, " ".join(result.output.split())


@pytest.mark.parametrize("reroute", [False, True], ids=["prune", "reroute"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_drawn_are_the_schedule(files, family, method, reroute):
    root, picture, ckpt = files
    out = root / f"{family}-{method}-{reroute}.png"
    mode = "--reroute" if reroute else "--prune"
    result, text = explain(
        "--model", ckpt[family], "--image", picture, "--prompt", "What is it?", "--method", method, mode,
        "--json", "--dpi", 30, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, text
    report = json.loads(result.stdout)
    assert report["files"] == [str(out)] and Image.open(out).size[0] > 100
    image = report["samples"][0]["images"][0]
    n = image["grid"][0] * image["grid"][1]
    layers, through, entering = expected_counts(str(ckpt[family]), method, reroute, n)
    assert report["decision_layers"] == layers
    ((label, decisions),) = image["decisions"].items()
    assert label == report["methods"][0] and ("Reroute" in label) == reroute
    assert [d["layer"] for d in decisions] == layers
    assert [d["kept"] + d["re-entered"] for d in decisions] == through
    for d in decisions:
        assert d["kept"] + d["re-entered"] + d["deferred"] + d["removed"] == n
        if reroute:  # only what a vision-side stage left out is gone for good
            assert d["removed"] == n - entering
        else:
            assert d["re-entered"] == d["deferred"] == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dart_compare_draws_both_twins_on_small_solved_counts(files, family):
    """The budget solved on a tiny image gives DART fewer tokens than its 4 image pivots: the twins
    are built from that schedule (``DART.from_schedule``), which an explicit keep below the pivots
    would be refused for."""
    root, picture, ckpt = files
    out = root / f"{family}-dart-compare.png"
    result, text = explain(
        "--model", ckpt[family], "--image", picture, "--prompt", "What is it?", "--method", "dart",
        "--reroute", "--compare", "--json", "--dpi", 30, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, text
    report = json.loads(result.stdout)
    assert report["methods"] == ["DART + Reroute", "DART"] and out.exists()
    image = report["samples"][0]["images"][0]
    n = image["grid"][0] * image["grid"][1]
    _, through, _ = expected_counts(str(ckpt[family]), "dart", True, n)
    assert min(through) < 4  # the case this test is about
    for decisions in image["decisions"].values():
        assert [d["kept"] + d["re-entered"] for d in decisions] == through
