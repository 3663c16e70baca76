"""The ``vlm_reroute`` lmms-eval model end to end on CPU: tiny checkpoints, tiny datasets, real lmms-eval.

Needs the ``eval`` extra (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from cli_support import SUBPROCESS_TIMEOUT_S  # noqa: E402
from eval_helpers import MAX_NEW_TOKENS, direct_answers, rec_docs, shared_workspace  # noqa: E402

from vlm_reroute.budget import ModelShape, compute_budget  # noqa: E402
from vlm_reroute.eval.metrics import sample_scores  # noqa: E402
from vlm_reroute.eval.tasks import refcoco  # noqa: E402
from vlm_reroute.methods import FastV, PDrop, method_from_spec  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return shared_workspace(tmp_path_factory)


def evaluate(ws, family_or_ckpt: str, model_args: str, task: str, batch_size: int = 1, **kwargs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(ws["tasks"]), include_defaults=False)
    return simple_evaluate(
        model="vlm_reroute",
        model_args=f"pretrained={ws[family_or_ckpt]},max_new_tokens={MAX_NEW_TOKENS},{model_args}",
        tasks=[task],
        task_manager=manager,
        device="cpu",
        batch_size=batch_size,
        log_samples=True,
        **kwargs,
    )


# family -> (model_args, reference method for (model, inputs), batch size). The schedules differ per
# family to cover an int FastV schedule, a tier solved per prompt and fractional keep with mixed sizes.
CASES = {
    "llava": ("method=fastv,layers=[2],keep=[64]", lambda m, i: FastV(layer=2, keep=64)),
    "qwen2_vl": (
        "method=pdrop,reroute=true,tier=24",
        lambda m, i: method_from_spec("pdrop", reroute=True, tier=24),
    ),
    "qwen2_5_vl": (
        "method=pdrop,reroute=true,layers=[2,4,6],keep=[0.5,0.5,0.25]",
        lambda m, i: PDrop(layers=[2, 4, 6], keep=[0.5, 0.5, 0.25], reroute=True),
    ),
}


@pytest.mark.parametrize("family", list(CASES))
def test_batched_plugin_answers_equal_direct_routed_generate(ws, family):
    model_args, reference = CASES[family]
    task = f"refcoco_bbox_rec_{family}_val"
    out = evaluate(ws, family, model_args, task, batch_size=3)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    docs = rec_docs(ws["rec"], family)
    assert [s["doc_id"] for s in samples] == list(range(len(docs))) and len(docs) == 8

    visual = refcoco.doc_to_visual if family == "llava" else refcoco.doc_to_visual_qwen
    text = {
        "llava": refcoco.doc_to_text_llava,
        "qwen2_vl": refcoco.doc_to_text_qwen2_vl,
        "qwen2_5_vl": refcoco.doc_to_text_qwen2_5_vl,
    }[family]
    expected = direct_answers(ws[family], [(visual(d)[0], text(d)) for d in docs], reference)
    for sample, (answer, _) in zip(samples, expected, strict=True):
        if family == "llava":
            answer = answer.split("ASSISTANT:")[0]  # the task's stop string
        assert sample["resps"][0][0] == answer

    # the score lmms-eval reports is the task's metric on these answers
    process = getattr(refcoco, f"process_results_{family}")
    hits = [
        sample_scores(d["bbox"], process(d, [s["resps"][0][0].strip()])["refcoco_IoU"]["pred"])["ACC@0.5"]
        for d, s in zip(docs, samples, strict=True)
    ]
    assert out["results"][task]["refcoco_ACC@0.5,none"] == pytest.approx(sum(hits) / len(hits))


def test_cost_is_logged_per_sample_from_the_trace(ws):
    """Schedule, tokens per layer, avg_T, TFLOPs and KV bytes as executed, checked with the budget module."""
    task = "refcoco_bbox_rec_llava_val"
    out = evaluate(ws, "llava", "method=pdrop,reroute=false,layers=[2,5],keep=[100,20]", task, limit=2)
    shape = ModelShape.from_config(ws["llava"] / "config.json")
    for sample in out["samples"][task]:
        cost = sample["token_counts"][0]["vlm_reroute"]
        assert cost["method"] == "PDrop"
        assert (cost["layers"], cost["kept"]) == ([2, 5], [100, 20])
        assert cost["visual_tokens"] == 576
        assert cost["tokens_per_layer"] == [576, 576, 100, 100, 100, 20, 20, 20]
        assert cost["avg_visual_tokens"] == pytest.approx((2 * 576 + 3 * 100 + 3 * 20) / 8)
        budget = compute_budget(
            shape.__class__(**{**shape.__dict__, "dtype_bytes": 4}),
            576,
            cost["text_tokens"],
            [2, 5],
            [100, 20],
        )
        assert cost["tflops"] == pytest.approx(budget.flops_fastv / 1e12)
        assert cost["kv_bytes"] == budget.kv_bytes
        assert cost["prefill_ms"] > 0 and cost["peak_memory_bytes"] > 0
        assert sample["token_counts"][0]["input_tokens"] == cost["text_tokens"] + 576


def test_vanilla_through_the_plugin_equals_plain_generate_on_pope(ws):
    out = evaluate(ws, "qwen2_5_vl", "method=none", "tiny_pope", batch_size=2)
    samples = sorted(out["samples"]["tiny_pope"], key=lambda s: s["doc_id"])
    import datasets
    from lmms_eval.tasks.pope import utils as pope

    docs = list(datasets.load_from_disk(str(ws["vqa"]))["test"])
    post = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    expected = direct_answers(
        ws["qwen2_5_vl"],
        [(pope.pope_doc_to_visual(d)[0], pope.pope_doc_to_text(d, post)) for d in docs],
        lambda m, i: None,
    )
    for sample, (answer, inputs) in zip(samples, expected, strict=True):
        assert sample["resps"][0][0] == answer
        cost = sample["token_counts"][0]["vlm_reroute"]
        n_visual = int(inputs["mm_token_type_ids"].sum())
        assert cost["method"] == "vanilla" and cost["layers"] == []
        assert cost["tokens_per_layer"] == [n_visual] * 8
    accuracy = sum(
        float(s["resps"][0][0].strip().lower() == d["answer"]) for s, d in zip(samples, docs, strict=True)
    )
    assert out["results"]["tiny_pope"]["pope_accuracy,none"] == pytest.approx(accuracy / len(docs))


def _launch(ws, out, launcher: list[str], model_args: str, task: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = [*launcher, "lmms_eval", "--model", "vlm_reroute", "--model_args", f"pretrained={model_args}",
               "--tasks", task, "--include_path", str(ws["tasks"]), "--device", "cpu", "--batch_size", "2",
               "--output_path", str(out), "--log_samples"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)


def _outputs(run: subprocess.CompletedProcess, out, task: str) -> tuple[dict, list[dict], str]:
    # lmms-eval exits 0 even when the model crashes: the files are the evidence
    assert run.returncode == 0, run.stderr[-3000:]
    results = list(out.rglob("*_results.json"))
    samples = list(out.rglob(f"*_samples_{task}.jsonl"))
    assert len(results) == 1 and len(samples) == 1, (run.stdout[-2000:], run.stderr[-3000:])
    lines = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text()), lines, run.stdout + run.stderr


def _cli(ws, tmp_path, launcher: list[str], model_args: str, task: str) -> tuple[dict, list[dict], str]:
    return _outputs(_launch(ws, tmp_path, launcher, model_args, task), tmp_path, task)


def test_python_m_lmms_eval_cli(ws, tmp_path):
    task = "refcoco_bbox_rec_llava_val"
    args = f"{ws['llava']},method=pdrop,reroute=true,tier=100,max_new_tokens=4"
    results, samples, _ = _cli(ws, tmp_path, [sys.executable, "-m"], args, task)
    assert "refcoco_ACC@0.5,none" in results["results"][task]
    assert len(samples) == 8
    for s in samples:
        cost = s["token_counts"][0]["vlm_reroute"]
        assert cost["method"] == "PDrop + Reroute" and len(cost["layers"]) == 4
        assert abs(cost["avg_visual_tokens"] - 100) <= 0.5


def test_python_m_lmms_eval_cli_on_the_hybrid_backbone(ws, tmp_path):
    """Qwen3.5 (the paper's third backbone) from its checkpoint alone, with its own RefCOCO variant."""
    task = "refcoco_bbox_rec_qwen3_5_val"
    args = f"{ws['qwen3_5']},method=pdrop,reroute=true,layers=[1,3,5],ratio=0.25,max_new_tokens=4"
    results, samples, _ = _cli(ws, tmp_path, [sys.executable, "-m"], args, task)
    assert "refcoco_ACC@0.5,none" in results["results"][task] and len(samples) == 8
    for s in samples:
        cost = s["token_counts"][0]["vlm_reroute"]
        assert cost["method"] == "PDrop + Reroute" and cost["layers"] == [1, 3, 5]
        assert s["refcoco_IoU"]["raw"] == s["filtered_resps"]


def test_accelerate_two_processes_shard_and_merge(ws, tmp_path):
    """Data parallel on CPU: two ranks answer disjoint halves; lmms-eval merges the samples and scores."""
    # on CPU, torchrun via --multi_gpu: accelerate falls back to a gloo (MULTI_CPU) group without GPUs
    import socket

    args = f"{ws['qwen2_vl']},method=fastv,reroute=false,tier=20,max_new_tokens=4"
    for attempt in range(3):
        with socket.socket() as s:  # a free port, so parallel test workers never collide
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        launcher += ["--main_process_port", port, "-m"]
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        run = _launch(ws, out, launcher, args, "tiny_pope")
        # the port was released before the launch: if another process took it, the launcher fails
        # (read in the whole log, where the rendezvous error precedes both ranks' tracebacks): pick again
        taken = any(sign in run.stdout + run.stderr for sign in ("EADDRINUSE", "address already in use"))
        if run.returncode != 0 and taken and attempt < 2:
            continue
        results, samples, _ = _outputs(run, out, "tiny_pope")
        break
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    assert {s["token_counts"][0]["vlm_reroute"]["rank"] for s in samples} == {0, 1}
    accuracy = sum(float(s["pope_accuracy"]["score"]) for s in samples) / 4
    assert results["results"]["tiny_pope"]["pope_accuracy,none"] == pytest.approx(accuracy)


def _loglik_reference(model, inputs, target, method) -> tuple[float, bool]:
    """Prefill the prompt (routed), then feed the continuation one token at a time through the cache."""
    from contextlib import nullcontext

    import torch

    total, greedy = 0.0, True
    with torch.no_grad(), method(model) if method is not None else nullcontext():
        out = model(**inputs, use_cache=True)
        mask = inputs["attention_mask"]
        for token in target:
            logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
            total += float(logprobs[token])
            greedy &= int(logprobs.argmax()) == int(token)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(
                input_ids=torch.tensor([[int(token)]]),
                past_key_values=out.past_key_values,
                attention_mask=mask,
                use_cache=True,
            )
    return total, greedy


@pytest.mark.parametrize("spec", ["method=none", "method=pdrop,reroute=true,layers=[2,5],keep=[48,24]"])
def test_loglikelihood_of_the_simple_model(ws, spec):
    """``--force_simple`` loglikelihood: log P(continuation | routed prompt), checked step by step."""
    import datasets
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    cls = get_model("vlm_reroute", force_simple=True)
    lm = cls.create_from_arg_string(f"pretrained={ws['llava']},{spec}", {"device": "cpu"})
    doc = next(iter(datasets.load_from_disk(str(ws["vqa"]))["test"]))
    lm.task_dict = {"t": {"test": [doc]}}
    visual = lambda d: [d["image"].convert("RGB")]  # noqa: E731
    continuations = [" yes", "Q4"]
    requests = [
        Instance(
            "loglikelihood",
            (doc["question"], c, visual, 0, "t", "test"),
            0,
            {"task": "t", "doc_id": 0, "repeats": 1},
        )
        for c in continuations
    ]
    scores = lm.loglikelihood(requests)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": visual(doc)[0]},
                {"type": "text", "text": doc["question"]},
            ],
        }
    ]
    inputs = lm.inputs([conversation])
    method = lm.spec.build()
    for (logprob, greedy), continuation in zip(scores, continuations, strict=True):
        target = lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        expected, expected_greedy = _loglik_reference(lm.model, inputs, target, method)
        assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0
        assert greedy == expected_greedy


def test_registry_resolves_the_entry_point_and_checks_model_args(ws):
    from lmms_eval.models import get_model

    from vlm_reroute.eval.model import VlmReroute, VlmRerouteSimple

    assert get_model("vlm_reroute") is VlmReroute and VlmReroute.is_simple is False
    assert get_model("vlm_reroute", force_simple=True) is VlmRerouteSimple
    with pytest.raises(ValueError, match=r"unknown model_args \['layer'\]; allowed are pretrained, method"):
        VlmReroute.create_from_arg_string(f"pretrained={ws['llava']},method=fastv,layer=[2],keep=[8]")
    with pytest.raises(ValueError, match="allowed are none, fastv, pdrop"):
        VlmReroute.create_from_arg_string(f"pretrained={ws['llava']},method=fastvv,tier=64")
    with pytest.raises(ValueError, match="min_pixels/max_pixels apply to the Qwen families .*, not Llava"):
        VlmReroute.create_from_arg_string(f"pretrained={ws['llava']},max_pixels=1000", {"device": "cpu"})
    lm = VlmReroute.create_from_arg_string(
        f"pretrained={ws['qwen2_5_vl']},method=pdrop,reroute=true,layers=[2,4,6],keep=[0.5,0.5,0.25],"
        "max_pixels=100000",
        {"device": "cpu", "batch_size": 2, "max_batch_size": None},
    )
    assert (lm.spec.layers, lm.spec.keep, lm.batch_size) == ((2, 4, 6), (0.5, 0.5, 0.25), 2)
    # max_pixels reaches the image processor: a 640 x 480 image shrinks to Qwen's smart_resize size
    from PIL import Image

    image = Image.new("RGB", (640, 480))
    inputs = lm.inputs([[{"role": "user", "content": [{"type": "image", "image": image}]}]])
    width, height = refcoco.qwen_input_size(640, 480, max_pixels=100000)
    assert int(inputs["mm_token_type_ids"].sum()) == width * height // 28**2 < 391
