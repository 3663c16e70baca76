"""The demo's scenes through lmms-eval (``vlm_reroute_demo_ground`` / ``_vqa``) give what ``vlm-reroute
demo``'s own pipeline gives, answer by answer.

Uses the demo model shipped in the package (``vlm_reroute.demo.checkpoint_path()``: a trained model),
so answers are not all the same string and the comparison can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from vlm_reroute.demo import checkpoint_path  # noqa: E402
from vlm_reroute.demo.benchmark import held_out  # noqa: E402
from vlm_reroute.demo.evaluate import answer_scenes, demo_pipeline  # noqa: E402
from vlm_reroute.demo.tasks import write_tasks  # noqa: E402
from vlm_reroute.eval.tasks.demo_scenes import GROUND_TASK, VQA_TASK, task_yaml  # noqa: E402
from vlm_reroute.methods import method_from_spec  # noqa: E402

CHECKPOINT = checkpoint_path()
N = 6


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("demo-tasks"), n_ground=N, n_vqa=N)


def _lmms(tasks: Path, model_args: str) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return simple_evaluate(
        model="vlm_reroute",
        model_args=f"pretrained={CHECKPOINT}{model_args}",
        tasks=[GROUND_TASK, VQA_TASK],
        task_manager=manager,
        device="cpu",
        batch_size=3,
        log_samples=True,
    )


@pytest.mark.parametrize("spec", [None, {"reroute": True, "ratio": 0.333}])
def test_lmms_eval_answers_equal_the_demo_pipeline(tasks, spec):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_args = ",method=pdrop,reroute=true,ratio=0.333" if spec else ""
    out = _lmms(tasks, model_args)
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    method = method_from_spec("pdrop", model=model, **spec) if spec else None
    pipe = demo_pipeline(model, processor, method)
    ground, vqa = held_out(N, N)
    for task, items in ((GROUND_TASK, ground), (VQA_TASK, vqa)):
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(N))
        expected = answer_scenes(pipe, items, batch_size=3)
        got = [s["filtered_resps"][0].strip() for s in samples]
        assert got == [e.text for e in expected]
        key = "demo_ACC@0.5" if task == GROUND_TASK else "demo_accuracy"
        assert [s[key] for s in samples] == [float(e.correct) for e in expected]
    assert len({e.text for e in answer_scenes(pipe, ground, batch_size=3)}) > 1  # not one constant answer


def test_write_tasks_refuses_empty_and_unknown(tmp_path):
    with pytest.raises(ValueError, match=r"n_ground=0: give a positive number"):
        write_tasks(tmp_path, n_ground=0)
    with pytest.raises(ValueError, match=r"task='demo': allowed are vlm_reroute_demo_ground"):
        task_yaml("demo", str(tmp_path))


def test_eval_model_demo_is_the_shipped_checkpoint_or_one_error(tmp_path, monkeypatch):
    from cli_support import assert_one_line_error, invoke

    import vlm_reroute.demo as demo

    monkeypatch.setattr(demo, "checkpoint_path", lambda: tmp_path / "no-weights-here")
    monkeypatch.setattr(demo, "has_checkpoint", lambda: False)
    result = invoke("eval", "--model", "demo", "--tasks", GROUND_TASK, "--out", tmp_path / "out")
    assert_one_line_error(result, "demo checkpoint is missing", "no-weights-here")
