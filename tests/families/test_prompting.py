"""``vlm_reroute.prompting``: inputs for families whose processor needs torchvision, from a saved folder.

The reference is the testing helpers' own placeholder expansion (``tiny_family_inputs``, written
from each processor's ``replace_image_token``): the prompt built here from a saved tiny checkpoint's
tokenizer, image processor and chat template must be token for token the same, and a routed
``generate()`` must run on the model loaded from that folder (what ``run`` / ``bench`` do).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from vlm_reroute import PDrop
from vlm_reroute.prompting import family_inputs
from vlm_reroute.testing.families import random_image, save_tiny_family_checkpoint, tiny_family_inputs
from vlm_reroute.testing.family_inputs import _FORMAT_OF, DEFAULT_IMAGES, QUESTIONS

NEEDS_TORCHVISION = ("qwen3_vl", "qwen3_5", "llava_onevision", "internvl", "smolvlm")


@pytest.mark.parametrize("family", NEEDS_TORCHVISION)
def test_saved_folder_prompts_match_the_processor_rule_and_route(family, tmp_path):
    path = save_tiny_family_checkpoint(family, tmp_path / family)
    model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    image_processor = tf.AutoImageProcessor.from_pretrained(path)
    sizes = DEFAULT_IMAGES[_FORMAT_OF[family]]
    images = [[random_image(h, w, 7919 * h + w) for h, w in row] for row in sizes]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * len(row) + [{"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for row, q in zip(images, QUESTIONS, strict=False)
    ]
    inputs = family_inputs(model, tokenizer, image_processor, images, texts)
    expected = tiny_family_inputs(family)
    assert inputs.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(inputs[key], value), key
    layers = [1, 3, 5, 7] if family == "qwen3_5" else [1, 2, 4, 6]
    with torch.no_grad(), PDrop(layers=layers, keep=[0.5, 0.5, 0.25, 0.125], reroute=True)(model) as trace:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and len(trace.decisions) == 4


def test_a_missing_placeholder_is_a_clear_error(tmp_path):
    path = save_tiny_family_checkpoint("internvl", tmp_path / "internvl")
    model = tf.AutoModelForImageTextToText.from_pretrained(path)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    image_processor = tf.AutoImageProcessor.from_pretrained(path)
    with pytest.raises(
        ValueError, match="1 images but the prompts hold 0 image placeholders '<IMG_CONTEXT>'"
    ):
        family_inputs(model, tokenizer, image_processor, [[random_image(50, 50, 0)]], ["no image here"])
