"""``vlm_reroute.testing.save_tiny_checkpoint`` for every family: a folder the Auto classes, the family
table, the pipeline and the command line load as they load a Hub checkpoint (the lmms-eval model is
covered per family by ``test_eval_families.py``)."""

from __future__ import annotations

import json
import sys

import pytest
import transformers as tf
from eval_helpers import shared_workspace
from typer.testing import CliRunner

import vlm_reroute
from vlm_reroute.cli import app
from vlm_reroute.families import FAMILIES, family_of_checkpoint
from vlm_reroute.testing import FAMILIES as TESTING_FAMILIES
from vlm_reroute.testing import save_tiny_checkpoint

pytest.importorskip("datasets", reason="the shared workspace writes datasets (eval extra)")
NAMES = [f.name for f in FAMILIES]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return shared_workspace(tmp_path_factory)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.new("RGB", (210, 150), (200, 60, 40)).save(path)
    return path


def test_the_testing_kit_covers_the_family_table():
    assert tuple(NAMES) == TESTING_FAMILIES
    with pytest.raises(ValueError, match="family='blip2': allowed are llava, llava_next"):
        save_tiny_checkpoint("blip2", "/nonexistent")


@pytest.mark.parametrize("family", NAMES)
def test_a_saved_family_loads_like_a_hub_checkpoint(ws, family, image):
    path = ws[family]
    entry = next(f for f in FAMILIES if f.name == family)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [entry.model_class] and family_of_checkpoint(str(path)) is entry
    model = tf.AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == entry.model_class
    assert tf.AutoTokenizer.from_pretrained(path).chat_template
    # the pipeline: prompt in the checkpoint's chat format, routed generate
    pipe = vlm_reroute.pipeline(path, "pdrop", reroute=True, layers=[1, 3, 5], ratio=0.4, max_new_tokens=3)
    answer = pipe(str(image), "Where is the red block?")
    assert [d["layer"] for d in answer.decisions] == [1, 3, 5] and answer.visual_tokens[0] > 0
    # the command line, from the folder alone
    run = CliRunner().invoke(
        app,
        ["run", "--model", str(path), "--image", str(image), "--prompt", "What is it?", "--layers", "1,3,5",
         "--ratio", "0.4", "--max-new-tokens", "2", "--device", "cpu", "--json"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["visual_tokens"] == answer.visual_tokens


def test_bench_and_explain_take_newer_families(ws, image, tmp_path):
    """bench on a multi-view family (InternVL tiles); explain draws single-grid layouts (Qwen3.5 here)."""
    path = ws["internvl"]
    bench = CliRunner().invoke(
        app,
        ["bench", "--model", str(path), "--image", str(image), "--method", "pdrop+reroute", "--ratio", "0.4",
         "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--device", "cpu", "--threads", "1",
         "--output", str(tmp_path / "bench.json")],
    )  # fmt: skip
    assert bench.exit_code == 0, bench.output
    assert (tmp_path / "bench.json").exists()
    explain = CliRunner().invoke(
        app,
        ["explain", "--model", str(ws["qwen3_5"]), "--image", str(image), "--prompt", "Where?",
         "--ratio", "0.4", "--layers", "1,3,5", "--out", str(tmp_path / "routing.png"), "--device", "cpu"],
    )  # fmt: skip
    assert explain.exit_code == 0, explain.output
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_m_vlm_reroute_testing_saves_any_family(tmp_path, monkeypatch, capsys):
    """The module's command line, run in this process (``runpy``, as ``python -m`` runs it)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["vlm_reroute.testing", "smolvlm", str(tmp_path / "smol")])
    runpy.run_module("vlm_reroute.testing", run_name="__main__")
    assert capsys.readouterr().out.strip() == str(tmp_path / "smol")
    assert family_of_checkpoint(str(tmp_path / "smol")).name == "smolvlm"
    monkeypatch.setattr(sys, "argv", ["vlm_reroute.testing", "blip2", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as usage:
        runpy.run_module("vlm_reroute.testing", run_name="__main__")
    assert ",".join(NAMES) in str(usage.value.code) and not (tmp_path / "x").exists()
