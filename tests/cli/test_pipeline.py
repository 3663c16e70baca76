"""``vlm_reroute.pipeline``: processor, chat format and family quirks handled, answers equal to a
hand-written reference, batches equal to single prompts, Qwen without torchvision."""

from __future__ import annotations

import pytest
import torch
import transformers
from cli_support import saved_checkpoints, saved_images
from PIL import Image

import vlm_reroute
from vlm_reroute import PDrop
from vlm_reroute.budget.shapes import ModelShape
from vlm_reroute.budget.solver import solve_schedule
from vlm_reroute.loading import quiet_transformers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return saved_images(tmp_path_factory)


@pytest.fixture(autouse=True)
def _quiet():
    with quiet_transformers():  # tests/conftest.py already runs every test on one thread
        yield


def test_answers_equal_a_hand_written_reference(checkpoints, images):
    pipe = vlm_reroute.pipeline(checkpoints["llava"], method="pdrop+reroute", ratio=0.25, max_new_tokens=4)
    answer = pipe(images["big"], "Where is the red box?")
    # reference: the model, its processor and LLaVA-1.5's prompt format, routed by hand
    model = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoints["llava"]).eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoints["llava"])
    prompt = "USER: <image>\nWhere is the red box? ASSISTANT:"
    inputs = processor(images=Image.open(images["big"]).convert("RGB"), text=prompt, return_tensors="pt")
    solved = solve_schedule(ModelShape.from_config(model.config), 576, "pdrop", True, avg_t=0.25 * 576)
    with torch.no_grad(), PDrop(layers=solved.layers, keep=solved.keep, reroute=True)(model) as trace:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert answer.token_ids == out[0, inputs["input_ids"].shape[1] :].tolist()
    assert answer.text == processor.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
    assert answer.decisions == [
        {"layer": d.layer, "kept": d.kept[0], "reentered": d.reentered[0]} for d in trace.decisions
    ]
    assert answer.visual_tokens == [576] and abs(answer.avg_visual_tokens - 144) <= 0.5
    plain = pipe(images["big"], "Where is the red box?", method=None)  # the model untouched
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert plain.token_ids == reference[0, inputs["input_ids"].shape[1] :].tolist() and plain.trace is None


def test_qwen_without_torchvision_and_several_images_batched(checkpoints, images):
    with pytest.raises(ImportError):  # why the pipeline assembles Qwen's inputs itself on this machine
        transformers.AutoProcessor.from_pretrained(checkpoints["qwen2_vl"])
    pipe = vlm_reroute.pipeline(checkpoints["qwen2_vl"], method="fastv+reroute", tier=40, max_new_tokens=3)

    def tokens(path) -> int:
        """Merged 28x28 patches: each side rounded to a multiple of 28 (images under the pixel cap)."""
        width, height = Image.open(path).size
        return round(height / 28) * round(width / 28)

    assert (tokens(images["big"]), tokens(images["small"])) == (14 * 18, 7 * 11)
    samples = [([images["big"], images["small"]], "Which is larger?"), (images["small"], "Color?")]
    batched = pipe.batch(samples)
    assert [a.visual_tokens for a in batched] == [
        [tokens(images["big"]), tokens(images["small"])],
        [tokens(images["small"])],
    ]
    for (pictures, question), answer in zip(samples, batched, strict=True):
        alone = pipe(pictures, question)
        assert (alone.token_ids, alone.decisions) == (answer.token_ids, answer.decisions)


def test_method_objects_loaded_models_and_clear_errors(checkpoints, images):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoints["llava"]).eval()
    method = PDrop(layers=[2, 4], keep=[100, 50], reroute=True)
    pipe = vlm_reroute.pipeline(model, method, processor=checkpoints["llava"], max_new_tokens=2)
    answer = pipe(Image.open(images["small"]), "Hi")
    assert [(d["layer"], d["kept"]) for d in answer.decisions] == [(2, 100), (4, 50)]
    assert answer.trace.method == repr(method)
    with pytest.raises(ValueError, match="method object carries its own"):
        vlm_reroute.pipeline(model, method, ratio=0.1, processor=checkpoints["llava"])
    with pytest.raises(TypeError, match="give None, a method name or a method object"):
        vlm_reroute.pipeline(model, 3, processor=checkpoints["llava"])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        vlm_reroute.pipeline(model, "nope", processor=checkpoints["llava"])


def test_the_function_is_not_shadowed_by_its_module():
    import vlm_reroute.pipelines  # noqa: F401  (importing the module must not replace the function)

    assert callable(vlm_reroute.pipeline) and vlm_reroute.pipeline.__name__ == "pipeline"
    assert "pipeline" in vlm_reroute.__all__ and vlm_reroute.Pipeline.__name__ == "Pipeline"
