"""Bad input gets one clear message naming the bad value and what is allowed, never a silent
unrouted run."""

from __future__ import annotations

import pytest
import torch
from conftest import model_for
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from vlm_reroute import FastV, PDrop
from vlm_reroute.testing.models import tiny_inputs


def test_layer_out_of_range(family):
    model = model_for(family)
    with (
        pytest.raises(ValueError, match=r"layer 8 is out of range.*8 layers.*1\.\.7"),
        PDrop(layers=[2, 8], keep=[64, 32])(model),
    ):
        pass
    with pytest.raises(ValueError, match=r"layer 0 is out of range"), FastV(layer=0, keep=8)(model):
        pass


@pytest.mark.parametrize("layers", [[4, 2], [2, 2]])
def test_unsorted_or_repeated_layers(layers):
    with pytest.raises(ValueError, match=r"strictly increasing"):
        PDrop(layers=layers, keep=[64, 32])


@pytest.mark.parametrize("keep", [0, -3])
def test_non_positive_keep(keep):
    with pytest.raises(ValueError, match=rf"keep={keep}.*≥ 1"):
        FastV(layer=2, keep=keep)


@pytest.mark.parametrize("keep", [1.5, 0.0, -0.1])
def test_ratio_outside_unit_interval(keep):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        PDrop(layers=[2], keep=[keep])


def test_keep_type_and_length():
    with pytest.raises(TypeError, match="keep=True"):
        FastV(layer=2, keep=True)
    with pytest.raises(ValueError, match="one keep entry per decision layer"):
        PDrop(layers=[2, 4], keep=[64])
    with pytest.raises(ValueError, match="score_from='last'"):
        FastV(layer=2, keep=8, score_from="last")


def test_count_above_image_tokens(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (10,))
    with (
        pytest.raises(ValueError, match=r"keep=577.*only 576 visual tokens.*1\.\.576"),
        FastV(layer=2, keep=577)(model),
    ):
        model(**inputs)


def test_increasing_counts_under_prune(family):
    with pytest.raises(ValueError, match=r"must not increase"):
        PDrop(layers=[2, 4], keep=[32, 64])
    model = model_for(family)
    inputs = tiny_inputs(model, (10,))
    # int and ratio mixed: only comparable once the image size is known
    with (
        pytest.raises(ValueError, match=r"counts \[32, 288\] increase"),
        PDrop(layers=[2, 4], keep=[32, 0.5])(model),
    ):
        model(**inputs)
    with PDrop(layers=[2, 4], keep=[32, 0.5], reroute=True)(model) as trace:  # fine under reroute
        model(**inputs)
    assert trace.decisions[1].kept == [288]


def test_batch_sample_without_image(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (10, 10))
    ids = inputs["input_ids"].clone()
    ids[1][ids[1] == model.config.image_token_id] = 5
    with (
        pytest.raises(ValueError, match=r"samples \[1\] of the batch have no image tokens"),
        FastV(layer=2, keep=16)(model),
    ):
        model(input_ids=ids, attention_mask=inputs["attention_mask"])


def test_unsupported_model_class():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
    )
    supported = r"LlamaForCausalLM is not supported.*LlavaForConditionalGeneration"
    with pytest.raises(TypeError, match=supported), FastV(layer=1, keep=8)(model):
        pass


def test_direct_decoder_call_is_refused(family):
    model = model_for(family)
    with FastV(layer=2, keep=8)(model), pytest.raises(RuntimeError, match="not its decoder"):
        model.model.language_model(input_ids=torch.tensor([[1, 2, 3]]))


def test_nested_application_is_refused(family):
    model = model_for(family)
    with (
        FastV(layer=2, keep=8)(model),
        pytest.raises(RuntimeError, match="already has"),
        PDrop(layers=[2], keep=[8])(model),
    ):
        pass


def test_static_cache_is_refused(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (10,))
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=700)
    with FastV(layer=2, keep=8)(model), pytest.raises(ValueError, match="StaticCache.*DynamicCache"):
        model(**inputs, past_key_values=cache)


def test_inputs_embeds_with_images_is_refused(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (10,))
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    inputs.pop("mm_token_type_ids", None)  # with it, Qwen's image tokens are located and routed
    with FastV(layer=2, keep=8)(model), pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, **inputs)
