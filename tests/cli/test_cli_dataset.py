"""Dataset mode: ``vlm-reroute run --input prompts.jsonl`` answers every line (several images per
prompt, batches), writes one JSON line per sample, and checks the whole file before loading."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_support import assert_one_line_error, invoke, saved_checkpoints, saved_images

import vlm_reroute.pipelines


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Three prompts with relative image paths: one with two images, a box, an id and an extra key."""
    root = tmp_path_factory.mktemp("dataset")
    images = saved_images(tmp_path_factory)
    (root / "pics").mkdir()
    for name, path in images.items():
        shutil.copy(path, root / "pics" / f"{name}.png")
    lines = [
        {"image": "pics/big.png", "prompt": "Where is the red box?", "box": [0.1, 0.2, 0.5, 0.9]},
        {"id": "pair", "image": ["pics/big.png", "pics/small.png"], "prompt": "Which is larger?", "tag": 7},
        {"image": ["pics/small.png"], "prompt": "What color?"},
    ]
    path = root / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    return path


def run_dataset(checkpoint, prompts, *args):
    result = invoke(
        "run", "--model", checkpoint, "--input", prompts, "--ratio", "0.3", "--max-new-tokens", "3",
        "--threads", "1", *args,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batches_write_one_line_per_sample_equal_to_one_by_one(checkpoints, prompts, tmp_path, family):
    out = tmp_path / "answers.jsonl"
    batched = run_dataset(checkpoints[family], prompts, "--batch-size", "2", "--output", out)
    log = " ".join(batched.stderr.split())
    assert (
        "3/3" in log and "3 answers (PDrop + Reroute) written to" in log
    )  # the progress bar, then a summary
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, "pair", 4]  # line numbers unless given (line 3 is blank)
    assert rows[0]["box"] == [0.1, 0.2, 0.5, 0.9] and rows[1]["tag"] == 7
    assert [len(r["visual_tokens"]) for r in rows] == [1, 2, 1]
    assert rows[1]["visual_tokens"][0] == rows[0]["visual_tokens"][0]  # same image, same token count
    assert all(r["method"] == "PDrop + Reroute" and isinstance(r["answer"], str) for r in rows)
    one_by_one = run_dataset(checkpoints[family], prompts, "--batch-size", "1")
    single = [json.loads(line) for line in one_by_one.stdout.splitlines()]  # stdout: JSON lines only
    for a, b in zip(rows, single, strict=True):
        assert a["decisions"] == b["decisions"] and a["visual_tokens"] == b["visual_tokens"]
        assert a["answer"] == b["answer"]


def test_compare_adds_the_vanilla_answer(checkpoints, prompts):
    result = run_dataset(checkpoints["llava"], prompts, "--compare", "--batch-size", "3")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3 and all(isinstance(r["vanilla_answer"], str) for r in rows)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            '{"image": "pics/big.png", "prompt": "ok"}\n{"image": "pics/big.png", "prompt": }',
            [":2:", "not a JSON"],
        ),
        ('{"image": "pics/nothere.png", "prompt": "x"}', [":1:", "image file not found: pics/nothere.png"]),
        ('{"image": "pics/big.png"}', [":1:", "'prompt' is None", "each line needs"]),
        ('{"image": [], "prompt": "x"}', [":1:", "'image' is []"]),
        ('{"image": "pics/big.png", "prompt": "x", "box": [1, 2]}', [":1:", "'box' is [1, 2]", "4 numbers"]),
        ("[1, 2]", [":1:", "not a JSON object"]),
        ("\n\n", ["has no prompts"]),
    ],
)
def test_bad_input_files_fail_before_the_model_loads(
    checkpoints, prompts, tmp_path, monkeypatch, content, fragments
):
    shutil.copytree(prompts.parent / "pics", tmp_path / "pics")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    monkeypatch.setattr(vlm_reroute.pipelines, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert_one_line_error(invoke("run", "--model", checkpoints["llava"], "--input", bad), *fragments)


def test_missing_input_file_and_unwritable_output(checkpoints, prompts, tmp_path):
    llava = checkpoints["llava"]
    assert_one_line_error(invoke("run", "--model", llava, "--input", tmp_path / "none.jsonl"), "no such file")
    nowhere = invoke("run", "--model", llava, "--input", prompts, "--output", tmp_path / "no" / "a.jsonl")
    assert_one_line_error(nowhere, "does not exist")


@pytest.mark.parametrize(
    ("failing_batch", "fragments", "kept"),
    [
        (2, ["line 4:", "RuntimeError: out of memory", "the 2 answers before it are in"], [1, "pair"]),
        (1, ["lines 1, 2:", "RuntimeError: out of memory", "no answers were written"], []),
    ],
)
def test_a_failing_batch_keeps_the_answers_before_it_and_names_its_lines(
    checkpoints, prompts, tmp_path, monkeypatch, failing_batch, fragments, kept
):
    batches = []
    generate = vlm_reroute.pipelines.Pipeline.generate

    def fails_once(self, inputs, *args, **kwargs):
        batches.append(inputs["input_ids"].shape[0])
        if len(batches) == failing_batch:
            raise RuntimeError("out of memory")
        return generate(self, inputs, *args, **kwargs)

    monkeypatch.setattr(vlm_reroute.pipelines.Pipeline, "generate", fails_once)
    out = tmp_path / "answers.jsonl"
    result = invoke(
        "run", "--model", checkpoints["llava"], "--input", prompts, "--ratio", "0.3", "--max-new-tokens", "3",
        "--threads", "1", "--batch-size", "2", "--output", out,
    )  # fmt: skip
    line = assert_one_line_error(result, *fragments)
    assert str(out) in line or not kept
    assert [json.loads(row)["id"] for row in out.read_text().splitlines()] == kept
    assert batches == [2, 1][:failing_batch]  # it stopped at the failure
