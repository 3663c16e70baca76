"""``--compare`` on a composed method (``divprune+sparsevlm``, ``visionzip+pdrop``): both twins are the
composite the user asked for, with its in-decoder method fixed to the solved counts and the labels
naming both parts. Before, ``from_schedule`` dropped ``then``: the twins ran the stage-1 method alone
with its pass-through scorer, labelled "VisionZip" / "VisionZip + Reroute"."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlm_reroute.adapters import adapter_for
from vlm_reroute.budget.shapes import ModelShape
from vlm_reroute.budget.target import BudgetTarget
from vlm_reroute.cli import app
from vlm_reroute.comparison import prune_and_reroute
from vlm_reroute.methods import FastV, PDrop, SparseVLM, VisionZip, method_from_spec
from vlm_reroute.pipelines import visual_tokens_per_image
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint
from vlm_reroute.testing.models import tiny_inputs, tiny_model

runner = CliRunner()
CASES = [
    # spec, settings, the in-decoder class of both twins, labels (chosen, twin)
    ("divprune+sparsevlm", {"reroute": True}, SparseVLM,
     ("DivPrune + SparseVLM + Reroute", "DivPrune + SparseVLM")),
    ("visionzip+pdrop", {"ratio": 0.3}, PDrop, ("VisionZip + PDrop", "VisionZip + PDrop + Reroute")),
]  # fmt: skip


@cache
def _llava():
    model = tiny_model("llava")
    return model, tiny_inputs(model)


def _run(method, model, inputs):
    with method(model) as trace, torch.no_grad():
        model(**inputs)
    return trace


@pytest.mark.parametrize(("spec", "settings", "inner", "labels"), CASES)
def test_both_twins_are_the_composite_with_the_solved_counts(spec, settings, inner, labels):
    model, inputs = _llava()
    chosen = method_from_spec(spec, **settings)
    (first, a), (second, b) = prune_and_reroute(chosen, True, model, inputs)
    assert (first, second) == labels
    assert type(a) is type(b) is type(chosen)
    assert type(a.then) is type(b.then) is inner and a.reroute != b.reroute
    assert type(a.make_scorer()) is type(b.make_scorer()) is type(chosen.make_scorer())
    # the in-decoder method runs the counts the composite resolves to, for the tokens that enter
    (n,) = {n for row in visual_tokens_per_image(model, inputs) for n in row}
    solved = chosen.bind(adapter_for(model)).resolve(ModelShape.from_config(model.config), n)
    assert a.then.schedule().keep == b.then.schedule().keep == solved.keep
    assert a.then.schedule().layers == b.then.schedule().layers == solved.layers
    ta, tb = _run(a, model, inputs), _run(b, model, inputs)
    assert [d.layer for d in ta.decisions] == [d.layer for d in tb.decisions] == [0, *solved.layers]
    assert ta.tokens_per_layer(8) == tb.tokens_per_layer(8)
    assert ta.tokens_per_layer(8)[0] == solved.entry < n  # stage 1 let fewer tokens in, in both twins


def test_a_composite_fastv_twin_keeps_the_composite_label_and_its_settings():
    """FastV + Reroute's prune twin is PDrop with FastV's counts (``twin_method``); inside a composite
    it reads "VisionZip + FastV", and the settings a schedule does not carry stay (``score_from``)."""
    model, inputs = _llava()
    fastv = FastV(reroute=True, target=BudgetTarget(ratio=0.3), score_from="previous")
    chosen = VisionZip() + fastv
    (first, a), (second, b) = prune_and_reroute(chosen, True, model, inputs)
    assert (first, second) == ("VisionZip + FastV + Reroute", "VisionZip + FastV")
    assert type(b.then) is PDrop and not b.reroute
    assert str(a.then.score_from.value) == str(b.then.score_from.value) == "previous"
    assert _run(a, model, inputs).tokens_per_layer(8) == _run(b, model, inputs).tokens_per_layer(8)


def test_a_plain_method_keeps_the_settings_a_schedule_does_not_carry():
    model, inputs = _llava()
    chosen = method_from_spec("random", reroute=True, ratio=0.3, seed=3)
    (_, a), (_, b) = prune_and_reroute(chosen, True, model, inputs)
    assert a.seed == b.seed == 3 and a.schedule() is not None and b.schedule() is not None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_composite")
    picture = root / "grey.png"
    Image.new("RGB", (112, 112), (120, 120, 120)).save(picture)
    return root, picture, save_tiny_checkpoint("llava", root / "llava", image_size=112)  # 64 tokens


def test_explain_compare_draws_the_composite_in_both_modes(files):
    root, picture, ckpt = files
    out = root / "divprune-sparsevlm.png"
    result = runner.invoke(
        app,
        [
            "explain", "--model", str(ckpt), "--image", str(picture), "--prompt", "What is it?",
            "--method", "divprune+sparsevlm", "--reroute", "--compare", "--json", "--dpi", "30",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["methods"] == ["DivPrune + SparseVLM + Reroute", "DivPrune + SparseVLM"]
    decisions = report["samples"][0]["images"][0]["decisions"]
    assert list(decisions) == report["methods"]
    reroute, prune = (decisions[label] for label in report["methods"])
    assert [d["layer"] for d in reroute] == [d["layer"] for d in prune] == report["decision_layers"]
    assert (
        report["decision_layers"][0] == 0 and len(report["decision_layers"]) == 4
    )  # stage 1 + SparseVLM's 3
    through = [[d["kept"] + d["re-entered"] for d in run] for run in (reroute, prune)]
    assert through[0] == through[1] and through[0][1] < through[0][0] < 64  # SparseVLM cut what entered
