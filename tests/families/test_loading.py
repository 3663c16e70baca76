"""Loading as a person meets it: devices and attention checked up front, a Hub id answered within
seconds without network, folders missing weights or processor named, images PIL cannot decode
refused with one line, libraries kept quiet (and restored), tiny checkpoints saved silently."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import transformers
from cli_support import SUBPROCESS_TIMEOUT_S, png_header, saved_checkpoints, saved_images, serve
from net_support import clear_proxies
from PIL import Image

from vlm_reroute import loading
from vlm_reroute.images import load_image
from vlm_reroute.loading import LoadError, PromptBuilder, quiet_transformers, resolve_source


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return saved_images(tmp_path_factory)


def test_devices_and_attention_are_checked_before_loading():
    assert loading.resolve_device("cpu") == torch.device("cpu")
    assert loading.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(LoadError, match="allowed are auto, cpu, cuda, cuda:N, mps"):
            loading.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="CUDA is not available on this machine"):
            loading.resolve_device("cuda")
    assert loading.check_attention("eager", torch.device("cpu")) == "eager"
    with pytest.raises(LoadError, match="flash_attention_2"):
        loading.check_attention("flash_attention_2", torch.device("cpu"))
    with pytest.raises(LoadError, match="allowed are sdpa, eager, flash_attention_2"):
        loading.check_attention("xformers", torch.device("cpu"))


def test_an_unanswered_connection_is_given_up_within_the_timeout(monkeypatch):
    """The answer comes while the connection attempt still hangs: it is given up, not awaited.
    (Asserted on the attempt's state, not on a wall-clock bound a loaded machine could miss.)"""
    from huggingface_hub import constants

    clear_proxies(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    targets = []

    def hang(address, *args, **kwargs):  # a connection attempt that gets no answer (until released)
        targets.append(address)
        started.set()
        release.wait(120)
        finished.set()
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    try:
        assert loading.hub_reachable(timeout=0.5) is False
        assert not finished.is_set()  # returned while the attempt was still waiting for an answer
        assert time.perf_counter() - start >= 0.45  # it did give the attempt its timeout
        assert started.wait(60) and targets[0] == ("hub.invalid", 443)  # the endpoint, no proxy
    finally:
        release.set()


def _cache_entry(cache, repo: str) -> None:
    """The layout huggingface_hub writes for a downloaded config.json."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_hub_ids_local_folders_and_the_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=0: False)
    _cache_entry(tmp_path / "hub", "org/cached-vlm")
    assert resolve_source("org/cached-vlm").local_files_only  # unreachable but cached: offline load
    with pytest.raises(LoadError, match="cannot be reached.*HF_HUB_OFFLINE=1"):
        resolve_source("org/other-vlm")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_source("org/cached-vlm").local_files_only
    with pytest.raises(LoadError, match="HF_HUB_OFFLINE=1 is set"):
        resolve_source("org/other-vlm")
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not resolve_source("org/other-vlm").local_files_only
    with pytest.raises(LoadError, match="no model folder at './missing/model'"):
        resolve_source("./missing/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="has no config.json"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_text("")
    with pytest.raises(LoadError, match="is a file"):
        resolve_source(str(tmp_path / "file.bin"))


def test_images_from_files_urls_and_pil_and_what_cannot_be_decoded(images, tmp_path, monkeypatch):
    clear_proxies(monkeypatch)  # the image server is on loopback: no proxy can reach it
    rgba = Image.new("RGBA", (30, 20), (1, 2, 3, 4))
    assert load_image(rgba).mode == "RGB" and load_image(images["small"]).size == (300, 200)
    (tmp_path / "bomb.png").write_bytes(png_header(14000, 14000))
    (tmp_path / "text.png").write_text("hello")
    with serve(images["small"].parent) as url:
        assert load_image(f"{url}/small.png").size == (300, 200)
    with pytest.raises(LoadError, match="too large to decode safely"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(LoadError, match="not an image PIL can read"):
        load_image(tmp_path / "text.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice its limit
    with pytest.raises(LoadError, match="too large"):
        load_image(images["small"])


def test_quiet_transformers_restores_what_it_changed():
    logging = transformers.utils.logging
    logging.set_verbosity_warning()
    logging.enable_progress_bar()
    with quiet_transformers():
        assert logging.get_verbosity() == logging.ERROR and not logging.is_progress_bar_enabled()
    assert logging.get_verbosity() == logging.WARNING and logging.is_progress_bar_enabled()


def test_prompts_batch_left_padded_with_one_placeholder_per_image(tmp_path_factory, images):
    llava = saved_checkpoints(tmp_path_factory)["llava"]
    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava)
    builder = PromptBuilder.from_pretrained(str(llava), model)
    pictures = [Image.open(images["big"]), Image.open(images["small"])]
    inputs = builder.batch([(pictures, "Two?"), (pictures[:1], "One, and a longer question?")], model)
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [2 * 576, 576] and inputs["pixel_values"].shape[0] == 3
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][:, 0].all()  # left padding


def test_saving_a_tiny_checkpoint_prints_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "vlm_reroute.testing", "qwen2_vl", str(tmp_path / "q")],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "" and done.stdout.strip() == str(tmp_path / "q")
    assert (tmp_path / "q" / "model.safetensors").is_file() and (tmp_path / "q" / "tokenizer.json").is_file()
