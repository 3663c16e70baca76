"""``vlm-reroute run`` on tiny checkpoints saved with ``save_pretrained``: relative budgets solved per
image, labels, explicit schedules, the clamp warning and ``--strict``, repeated timings with
``--compare``, and every error a person can cause as one line with status 1."""

from __future__ import annotations

import json
import shutil
from statistics import median, quantiles

import pytest
import torch
from cli_support import assert_one_line_error, invoke, png_header, saved_checkpoints, saved_images, serve
from net_support import clear_proxies, refusing_port

from vlm_reroute.budget.solver import solve_for_target

NUM_LAYERS = 8  # the tiny checkpoints' decoder depth


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return saved_images(tmp_path_factory)


def run_json(*args: str) -> dict:
    result = invoke("run", *args, "--json", "--threads", "1", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def avg_t(layers: list[int], keep: list[int], n: int) -> float:
    ends = [*layers[1:], NUM_LAYERS]
    return (layers[0] * n + sum(k * (b - a) for k, a, b in zip(keep, layers, ends, strict=True))) / NUM_LAYERS


def test_a_ratio_is_solved_for_each_image_of_a_qwen_prompt(checkpoints, images):
    report = run_json(
        "--model", checkpoints["qwen2_vl"], "--image", images["big"], "--image", images["small"],
        "--prompt", "Which is larger?", "--ratio", "0.5",
    )  # fmt: skip
    big, small = report["visual_tokens"]
    assert big > small > 0 and report["images"] == [str(images["big"]), str(images["small"])]
    schedule = report["schedule"]
    for n, keep in zip((big, small), schedule["keep_per_image"], strict=True):
        assert abs(avg_t(schedule["layers"], keep, n) - 0.5 * n) <= 0.5  # half of *this* image's tokens
    assert [d["layer"] for d in report["decisions"]] == schedule["layers"]
    first = schedule["keep_per_image"]
    assert [d["kept"] for d in report["decisions"]] == [a + b for a, b in zip(*first, strict=True)]
    assert report["method"] == "PDrop + Reroute" and report["budget"] == {"ratio": 0.5}


@pytest.mark.parametrize(
    ("method", "mode", "label"), [("fastv", "--prune", "FastV"), ("pdrop", "--prune", "PDrop")]
)
def test_the_label_is_the_method_that_ran(checkpoints, images, method, mode, label):
    args = [
        "--model",
        checkpoints["llava"],
        "--image",
        images["big"],
        "--prompt",
        "Hi",
        "--method",
        method,
        mode,
    ]
    report = run_json(*args, "--tier", "200")
    assert report["method"] == label and report["method_spec"].startswith(label.split()[0])
    text = invoke("run", *args, "--tier", "200", "--max-new-tokens", "1", "--threads", "1")
    assert text.exit_code == 0 and text.stdout.startswith(f"{label} on ")


def test_an_unreachable_budget_is_clamped_with_one_warning_or_refused_with_strict(checkpoints, images):
    solve_for_target.cache_clear()  # the solver warns once per image size and process
    args = ["--model", checkpoints["llava"], "--image", images["big"], "--prompt", "Hi", "--tier", "20"]
    result = invoke("run", *args, "--max-new-tokens", "1", "--threads", "1")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    # PDrop + Reroute on layers [1, 2, 4, 6]: at least (1 x 576 + 7 x 1) / 8 = 72.88 tokens per layer
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "72.88" in warnings[0]
    assert "(avg_T 72.9)" in result.stdout
    solve_for_target.cache_clear()
    assert_one_line_error(invoke("run", *args, "--strict"), "not reachable", "72.88..396.00")


def test_explicit_schedules_with_fractions_and_layers_with_a_budget(checkpoints, images):
    base = ["--model", checkpoints["llava"], "--image", images["big"], "--prompt", "Hi", "--prune"]
    report = run_json(*base, "--layers", "2,5", "--keep", "0.5,0.25")
    assert report["schedule"]["keep"] == [288, 144]  # max(1, int(576 x f))
    assert [(d["layer"], d["kept"]) for d in report["decisions"]] == [(2, 288), (5, 144)]
    solved = run_json(*base, "--layers", "2,5", "--tier", "300")  # the tier is solved on these layers
    assert solved["schedule"]["layers"] == [2, 5]
    assert abs(avg_t([2, 5], solved["schedule"]["keep"], 576) - 300) <= 0.5


def test_compare_times_repeated_interleaved_runs_with_one_statistic(checkpoints, images):
    report = run_json(
        "--model", checkpoints["llava"], "--image", images["big"], "--prompt", "Hi", "--tier", "150",
        "--compare", "--repeats", "4",
    )  # fmt: skip
    routed, vanilla = report["prefill"], report["vanilla"]["prefill"]
    for p in (routed, vanilla):
        assert len(p["runs_s"]) == 4 and p["median_s"] == pytest.approx(median(p["runs_s"]))
        q1, _, q3 = quantiles(p["runs_s"], n=4, method="inclusive")
        assert (p["q1_s"], p["q3_s"]) == pytest.approx((q1, q3))
    speedup = report["speedup"]
    assert speedup["value"] == pytest.approx(vanilla["median_s"] / routed["median_s"])
    assert speedup["low"] == pytest.approx(vanilla["q1_s"] / routed["q3_s"])
    assert speedup["high"] == pytest.approx(vanilla["q3_s"] / routed["q1_s"])
    assert speedup["low"] <= speedup["value"] <= speedup["high"]
    assert report["kv_bytes"] < report["vanilla"]["kv_bytes"] and isinstance(report["vanilla"]["answer"], str)
    assert report["threads"] == 1 and report["timing"] == {"repeats": 4, "warmup": 1, "interleaved": True}


def test_human_output_labels_single_runs_and_prints_the_threads(checkpoints, images):
    args = ["--model", checkpoints["llava"], "--image", images["big"], "--prompt", "Hi", "--tier", "150"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's default in this process, which the command must report
    try:
        single = invoke("run", *args, "--max-new-tokens", "1")
    finally:
        torch.set_num_threads(before)
    assert single.exit_code == 0 and "(single run" in single.stdout
    assert "1 thread (torch default)" in " ".join(single.stdout.split())
    compared = invoke("run", *args, "--max-new-tokens", "1", "--compare", "--repeats", "2", "--threads", "1")
    out = " ".join(compared.stdout.split())
    assert (
        compared.exit_code == 0
        and "median (q1–q3) of 2 interleaved runs" in out
        and "1 thread (--threads)" in out
    )
    assert "speedup" in out and "single run" not in out


@pytest.fixture(scope="module")
def served(tmp_path_factory, images):
    """A local HTTP server with a non-image, a truncated PNG and a good PNG."""
    root = tmp_path_factory.mktemp("served")
    (root / "page.png").write_text("<html>not an image</html>")
    data = images["big"].read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    with serve(root) as url:
        yield url


def _broken_folders(tmp_path, checkpoints):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(checkpoints["llava"] / "config.json", no_weights)
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(checkpoints["llava"] / name, no_processor)
    return no_weights, no_processor


def test_every_error_is_one_line_with_status_1(checkpoints, images, served, tmp_path, monkeypatch):
    clear_proxies(monkeypatch)  # the image server is on loopback: no proxy can reach it
    import vlm_reroute.pipelines

    llava, image = str(checkpoints["llava"]), str(images["big"])
    no_weights, no_processor = _broken_folders(tmp_path, checkpoints)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(14000, 14000))
    cut = tmp_path / "cut.png"
    cut.write_bytes(images["big"].read_bytes()[:300])

    def run(*args):
        return invoke("run", "--model", llava, "--prompt", "Hi", *args)

    cases = [
        (run("--image", tmp_path / "missing.png"), ["image file not found"]),
        (run("--image", tmp_path), ["is a folder"]),
        (run("--image", bomb), ["too large", "196000000"]),
        (run("--image", cut), ["cannot decode image", "cut.png"]),
        (run("--image", f"{served}/page.png"), ["not an image PIL can read"]),
        (run("--image", f"{served}/cut.png"), ["cannot decode image", "cut.png"]),
        (run("--image", f"{served}/absent.png"), ["cannot download image", "404"]),
        (run("--image", image, "--device", "tpu"), ["device 'tpu'", "allowed are auto, cpu, cuda"]),
        (run("--image", image, "--device", "cuda:99"), ["device 'cuda:99'"]),
        (run("--image", image, "--attn", "flash_attention_2"), ["flash_attention_2"]),
        (run("--image", image, "--attn", "fast"), ["attention 'fast'", "sdpa, eager"]),
        (run("--image", image, "--dtype", "float8"), ["dtype 'float8'", "float32"]),
        (run("--image", image, "--method", "nuwa9"), ["unknown method 'nuwa9'", "fastv"]),
        (run("--image", image, "--keep", "0.5,x", "--layers", "1,2"), ["--keep '0.5,x'", "0.5,0.25"]),
        (run("--image", image, "--keep", "46"), ["--keep needs --layers"]),
        (run("--image", image, "--layers", "2", "--keep", "46", "--tier", "64"), ["--tier 64 with --keep"]),
        (
            run("--image", image, "--layers", "2", "--keep", "46", "--strict"),
            ["--strict applies to a budget"],
        ),
        (run("--image", image, "--layers", "2,9", "--keep", "46,20"), ["9"]),
        (run("--image", image, "--layers", "2", "--keep", "1000"), ["1000"]),
        (run(), ["give --image"]),
        (run("--image", image, "--input", tmp_path / "p.jsonl"), ["--input", "drop --image"]),
        (invoke("run", "--model", no_weights, "--image", image, "--prompt", "Hi"), ["no weights"]),
        (invoke("run", "--model", no_processor, "--image", image, "--prompt", "Hi"), ["no tokenizer"]),
        (
            invoke("run", "--model", tmp_path / "absent", "--image", image, "--prompt", "Hi"),
            ["no model folder"],
        ),
        (run("--image", image, "--output", tmp_path / "nowhere" / "a.json"), ["does not exist"]),
    ]
    if not torch.cuda.is_available():
        cases.append((run("--image", image, "--device", "cuda"), ["CUDA is not available", "use cpu"]))
    for result, fragments in cases:
        assert_one_line_error(result, *fragments)
    # output paths are checked before any work: the model is never loaded
    monkeypatch.setattr(vlm_reroute.pipelines, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert_one_line_error(
        run("--image", image, "--output", tmp_path / "nowhere" / "a.json"), "does not exist"
    )
    bench = invoke("bench", "--model", llava, "--image", image, "--output", "/nonexistent_dir/r.json")
    assert_one_line_error(bench, "/nonexistent_dir")


def test_a_hub_id_without_network_fails_fast_and_names_the_ways_out(images, monkeypatch, tmp_path):
    """Failing fast is shown by what happens, not by a wall clock: one reachability check
    (bounded by its own timeout) answers, and no model download or load is ever attempted."""
    from huggingface_hub import constants

    import vlm_reroute.pipelines
    from vlm_reroute import loading

    clear_proxies(monkeypatch)  # the endpoint is on loopback: a proxy must not answer for it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    checks = []
    reachable = loading.hub_reachable
    monkeypatch.setattr(
        loading, "hub_reachable", lambda *a, **k: checks.append(reachable(*a, **k)) or checks[-1]
    )
    monkeypatch.setattr(
        vlm_reroute.pipelines, "load_model", lambda *a, **k: pytest.fail("model load attempted")
    )
    with refusing_port() as port:  # the endpoint: a loopback port nothing can listen on
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        result = invoke("run", "--model", "someone/some-vlm", "--image", images["big"], "--prompt", "Hi")
    assert checks == [False]
    assert_one_line_error(
        result,
        "'someone/some-vlm'",
        "cannot be reached",
        f"127.0.0.1:{port}",
        "HF_HUB_OFFLINE=1",
        "local model folder",
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = invoke("run", "--model", "someone/some-vlm", "--image", images["big"], "--prompt", "Hi")
    assert_one_line_error(offline, "nor in the Hugging Face cache", "HF_HUB_OFFLINE=1 is set")
