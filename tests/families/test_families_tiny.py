"""The tiny family models of ``vlm_reroute.testing.families``: they run, their inputs fit them, they save.

The reference for every layout is the model itself: the image features its own vision path
produces (captured during a forward) must fill exactly the image-token positions of the inputs,
image by image; a batch must give what each prompt gives alone; a saved folder must load back to
the same weights and the same inputs.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
import transformers as tf
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

from vlm_reroute.testing.families import (
    FAMILY_CLASSES,
    IMAGE_TOKEN,
    NEW_FAMILIES,
    SPECIALS,
    load_family_processor,
    save_tiny_family_checkpoint,
    tiny_family_inputs,
    tiny_family_model,
    tiny_family_processor,
)
from vlm_reroute.testing.family_inputs import (
    _FORMAT_OF,
    DEFAULT_IMAGES,
    OFFLINE_PROCESSORS,
    PROCESSORS,
    QUESTIONS,
)


@cache
def _model(family: str, attn: str = "sdpa"):
    return tiny_family_model(family, attn_implementation=attn)


@cache
def _inputs(family: str) -> dict[str, torch.Tensor]:
    return tiny_family_inputs(family)


@pytest.fixture(params=NEW_FAMILIES)
def family(request) -> str:
    return request.param


def _runs(row: torch.Tensor, token: int) -> list[int]:
    """Lengths of the maximal runs of ``token`` in ``row``, left to right."""
    runs, current = [], 0
    for t in row.tolist() + [None]:
        if t == token:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_real_class_and_attention(family):
    model = _model(family, "eager")
    assert type(model).__name__ == FAMILY_CLASSES[family]
    assert model.config.get_text_config()._attn_implementation == "eager"
    assert model.config.get_text_config().num_hidden_layers == 8


def test_generate_on_left_padded_batch_matches_each_prompt_alone(family):
    model, inputs = _model(family), _inputs(family)
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2 and mask[:, -1].all() and not mask[:, 0].all()  # left padding
    out = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)
    for b, sizes in enumerate(DEFAULT_IMAGES[_FORMAT_OF[family]]):
        alone = tiny_family_inputs(family, sizes=(sizes,), questions=(QUESTIONS[b],))
        assert alone["attention_mask"].all()
        logits = model(**alone).logits[0, -1]
        torch.testing.assert_close(out.scores[0][b], logits, atol=2e-4, rtol=1e-4)
        assert torch.isfinite(logits).all()


def _capture_features(model, inputs) -> object:
    """Run a forward and return what the model's own ``get_image_features`` produced in it."""
    captured = []
    original = model.model.get_image_features

    def spy(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    model.model.get_image_features = spy
    try:
        model(**inputs)
    finally:
        del model.model.get_image_features
    assert len(captured) == 1
    return captured[0]


def test_image_token_positions_match_image_features(family):
    model, inputs = _model(family), _inputs(family)
    ids = inputs["input_ids"]
    features = _capture_features(model, inputs).pooler_output
    kind = _FORMAT_OF[family]
    assert (ids == IMAGE_TOKEN).sum() > 0
    if kind in ("qwen", "llava_next", "llava_onevision"):  # one contiguous run per image
        spans = [n for row in ids for n in _runs(row, IMAGE_TOKEN)]
        assert spans == [f.shape[0] for f in features]
        assert len(spans) == sum(len(s) for s in DEFAULT_IMAGES[kind])
    elif kind == "internvl":  # one run per image, 16 tokens per tile; features are (tiles, 16, hidden)
        spans = [n for row in ids for n in _runs(row, IMAGE_TOKEN)]
        assert len(spans) == 3 and all(n % 16 == 0 for n in spans)
        assert sum(spans) == features.shape[0] * features.shape[1] and features.shape[1] == 16
        assert features.shape[0] > 3  # the 100x230 image is split into tiles (+ thumbnail)
    else:  # Idefics3 / SmolVLM: one 16-token run per tile; features per prompt
        per_prompt = [sum(_runs(row, IMAGE_TOKEN)) for row in ids]
        assert per_prompt == [f.shape[0] for f in features]
        assert all(n == 16 for row in ids for n in _runs(row, IMAGE_TOKEN))


def test_qwen3_vl_deepstack_features_follow_the_image_tokens():
    model, inputs = _model("qwen3_vl"), _inputs("qwen3_vl")
    out = _capture_features(model, inputs)
    counts = [f.shape[0] for f in out.pooler_output]
    assert len(out.deepstack_features) == len(model.config.vision_config.deepstack_visual_indexes) == 3
    for level in out.deepstack_features:
        assert [f.shape[0] for f in level] == counts
    # the decoder adds level i to the visual positions after decoder layer i (i = 0, 1, 2)
    text_model = model.model.language_model
    calls = []
    original = text_model._deepstack_process

    def spy(hidden, mask, embeds):
        calls.append((int(mask.sum()), embeds.shape[0]))
        return original(hidden, mask, embeds)

    text_model._deepstack_process = spy
    try:
        model(**inputs)
    finally:
        del text_model._deepstack_process
    n_visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    assert calls == [(n_visual, n_visual)] * 3


def test_qwen_mrope_positions_are_not_one_dimensional():
    model, inputs = _model("qwen3_vl"), _inputs("qwen3_vl")
    assert "mm_token_type_ids" in inputs
    pos, deltas = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    visual = inputs["input_ids"] == IMAGE_TOKEN
    assert (pos[1][visual] != pos[2][visual]).any()  # rows and columns get their own positions
    assert (deltas < 0).all()  # each image spans fewer positions than tokens


def test_qwen3_5_hybrid_layers_and_cache():
    model, inputs = _model("qwen3_5"), _inputs("qwen3_5")
    cfg = model.config.text_config
    types = cfg.layer_types
    assert set(types) == {"linear_attention", "full_attention"} and types[0] == "linear_attention"
    layers = model.model.language_model.layers
    for layer, kind in zip(layers, types, strict=True):
        assert hasattr(layer, "linear_attn" if kind == "linear_attention" else "self_attn")
    cache = model(**inputs, use_cache=True).past_key_values
    batch, length = inputs["input_ids"].shape
    first_full = types.index("full_attention")
    for i, kind in enumerate(types):
        layer = cache.layers[i]
        if kind == "linear_attention":
            assert type(layer) is LinearAttentionLayer
            conv = layer.conv_states[0]
            conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
                cfg.linear_num_value_heads * cfg.linear_value_head_dim
            )
            assert conv.shape == (batch, conv_dim, cfg.linear_conv_kernel_dim)
            assert layer.recurrent_states[0].shape == (
                batch,
                cfg.linear_num_value_heads,
                cfg.linear_key_head_dim,
                cfg.linear_value_head_dim,
            )
        else:
            assert type(layer) is DynamicLayer
            assert layer.keys.shape == (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    # the cache's length is the first full-attention layer's
    assert cache.get_seq_length() == cache.layers[first_full].get_seq_length() == length


def test_saved_checkpoint_loads_offline(family, tmp_path):
    path = save_tiny_family_checkpoint(family, tmp_path / family)
    model = tf.AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == FAMILY_CLASSES[family]
    also = getattr(tf, FAMILY_CLASSES[family]).from_pretrained(path)
    reference = _model(family).state_dict()
    for weights in (model.state_dict(), also.state_dict()):
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference)
    if family in OFFLINE_PROCESSORS:
        assert type(tf.AutoProcessor.from_pretrained(path)).__name__ == PROCESSORS[family][0]
    bundle = load_family_processor(path)
    assert bundle.tokenizer.padding_side == "left"
    ids = bundle.tokenizer.convert_tokens_to_ids(list(SPECIALS[family]))
    assert ids == list(SPECIALS[family].values())
    loaded, original = tiny_family_inputs(family, bundle=bundle), _inputs(family)
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def _image_672():
    from vlm_reroute.testing.families import random_image

    return random_image(672, 672, seed=0)


def _tokens_672(name: str) -> int:
    """Visual tokens of a 672x672 image at the family's default processor settings, from the real
    image processor classes (PIL backend) and the processor's placeholder rule."""
    from vlm_reroute.testing.family_inputs import _onevision_tokens

    img = _image_672()
    if name.startswith("qwen3"):
        ip = tf.Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216}
        )
        return int(ip(images=[img], return_tensors="pt")["image_grid_thw"].prod()) // 4
    if name.startswith("llava-next"):
        pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        ip = tf.LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pins
        )
        tok = tiny_family_processor("llava_next").tokenizer
        proc = tf.LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        return int(
            (proc(images=[img], text=["<image>"], return_tensors="pt")["input_ids"] == IMAGE_TOKEN).sum()
        )
    if name.startswith("llava-onevision"):
        pins = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
        ip = tf.LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=pins)
        return _onevision_tokens(672, 672, ip, 729, "anyres_max_9")
    if name.startswith("internvl3"):
        ip = tf.GotOcr2ImageProcessorPil(
            size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12
        )
        return 256 * int(ip(images=[img], return_tensors="pt")["num_patches"][0])
    longest, tile, per_tile = (1456, 364, 169) if name.startswith("idefics3") else (1536, 384, 81)
    ip = tf.Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": tile})
    out = ip(images=[[img]], return_tensors="pt", return_row_col_info=True)
    return (out["rows"][0][0] * out["cols"][0][0] + 1) * per_tile


NEW_SHAPES = (
    "qwen3-vl-2b",
    "qwen3-vl-4b",
    "qwen3-vl-8b",
    "llava-next-vicuna-7b",
    "llava-next-mistral-7b",
    "llava-onevision-0.5b",
    "llava-onevision-7b",
    "internvl3-2b",
    "internvl3-8b",
    "smolvlm-2b",
    "idefics3-8b",
)


@pytest.mark.parametrize("name", NEW_SHAPES)
def test_shipped_shapes_load_and_their_image_token_counts_follow_the_processors(name):
    from vlm_reroute.budget.shapes import load_model_info

    info = load_model_info(name)
    shape = info.shape
    assert shape.num_heads % shape.num_kv_heads == 0 and shape.num_layers >= 24
    assert info.default_visual_tokens == _tokens_672(name)
    assert "672x672" in info.visual_tokens_note
