"""Every family through lmms-eval end to end: its tiny checkpoint, its RefCOCO task variant on a local
RefCOCO-shaped dataset (VQA for the families without a grounding format), prune and reroute, batch 1 and 2.

One model per family is loaded once and re-used for the four runs (``set_method``, ``batch_size``), as the
grid runner does; the dataset, tasks and checkpoints are the session's shared workspace.
"""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from eval_helpers import shared_workspace  # noqa: E402

from vlm_reroute.eval.parsers import parser_for  # noqa: E402
from vlm_reroute.families import FAMILIES, get_family  # noqa: E402
from vlm_reroute.methods.spec import MethodSpec  # noqa: E402

LIMIT = 3  # samples per run (the first images' expressions): enough for a batch of 2 and a remainder
# decision layers every tiny family accepts (Qwen3.5's hybrid decoder scores at full-attention layers 1,3,5,7)
LAYERS, KEEP = (1, 3, 5), (0.5, 0.25, 0.125)
SPECS = {
    "prune": MethodSpec("pdrop", reroute=False, layers=LAYERS, keep=KEEP),
    "reroute": MethodSpec("pdrop", reroute=True, layers=LAYERS, keep=KEEP),
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return shared_workspace(tmp_path_factory)


def _run(model, task: str, manager) -> list[dict]:
    from lmms_eval.evaluator import simple_evaluate

    out = simple_evaluate(model=model, tasks=[task], limit=LIMIT, log_samples=True, task_manager=manager)
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _answers(ws, family: str, task: str) -> dict[tuple[str, int], list[dict]]:
    """Logged samples of ``task`` for prune and reroute at batch sizes 1 and 2, one model load."""
    from lmms_eval.tasks import TaskManager

    from vlm_reroute.eval.model import VlmReroute

    manager = TaskManager(include_path=str(ws["tasks"]), include_defaults=False)
    model = VlmReroute(pretrained=str(ws[family]), device="cpu", max_new_tokens=8)
    model.reusable = True
    runs = {}
    for mode, spec in SPECS.items():
        model.set_method(spec)
        for batch in (1, 2):
            model.batch_size_per_gpu = batch
            runs[mode, batch] = _run(model, task, manager)
    return runs


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_family_runs_lmms_eval_prune_and_reroute_batch_1_and_2(ws, family):
    grounding = get_family(family).grounding is not None
    task = f"refcoco_bbox_rec_{family}_val" if grounding else "tiny_pope"
    runs = _answers(ws, family, task)
    for mode in SPECS:
        one, two = runs[mode, 1], runs[mode, 2]
        assert [s["doc_id"] for s in one] == list(range(LIMIT))
        # a sample gets the same answer alone or batched (left-padded), and the cost of what ran
        assert [s["resps"] for s in one] == [s["resps"] for s in two]
        assert any(s["resps"][0][0].strip() for s in one)  # answers, not empty strings
        for batch, samples in ((1, one), (2, two)):
            for sample in samples:
                cost = sample["token_counts"][0]["vlm_reroute"]
                assert cost["method"] == ("PDrop + Reroute" if mode == "reroute" else "PDrop")
                assert cost["layers"] == list(LAYERS) and cost["batch_size"] <= batch
                assert cost["tokens_per_layer"][0] == cost["visual_tokens"] > cost["tokens_per_layer"][-1] > 0
    if not grounding:
        assert all(s["pope_accuracy"]["score"] in (0, 1) for s in runs["prune", 1])
        return
    # the logged prediction is the family's parser applied to the logged answer
    parse = parser_for(family)
    for samples in runs.values():
        for sample in samples:
            record = sample["refcoco_IoU"]
            assert record["raw"] == sample["resps"][0][0]
            doc = sample["doc"]
            expected = parse(record["raw"], doc["input_width"], doc["input_height"])
            assert record["pred"] == (list(expected) if expected is not None else None)


def test_the_local_dataset_has_lmms_eval_s_refcoco_columns(ws):
    """What lmms-eval's RefCOCO rows hold (``lmms-lab-encoder/RefCOCO``), so the tasks' own code runs."""
    import datasets

    rows = datasets.load_from_disk(str(ws["rec"]))["val"]
    assert {
        "question_id",
        "image",
        "question",
        "answer",
        "segmentation",
        "bbox",
        "iscrowd",
        "file_name",
    } <= set(rows.column_names)
    first = rows[0]
    x, y, w, h = first["bbox"]
    assert first["segmentation"] == pytest.approx([x, y, x + w, y, x + w, y + h, x, y + h])
    assert first["iscrowd"] == 0 and len(first["answer"]) == 2
