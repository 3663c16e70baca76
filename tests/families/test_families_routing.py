"""Routing on the newer families with their processors' layouts (tiny models, real classes).

The method x family matrix (``test_matrix.py``) runs one equal image per prompt; here each family
runs its processor's default batch: left padding, one image in the first prompt, two images of
other sizes in the second. References are independent of the router: the model's own image
features for the layouts, each prompt encoded alone by the processor for the batch, and the
hand-driven reference decoder (``reference.py``) for the generated tokens.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from reference import routed_reference

from vlm_reroute import FastV, PDrop, kv_lengths
from vlm_reroute.adapters import adapter_for
from vlm_reroute.testing.families import (
    IMAGE_TOKEN,
    random_image,
    tiny_family_inputs,
    tiny_family_model,
    tiny_family_processor,
)
from vlm_reroute.testing.family_inputs import _FORMAT_OF, DEFAULT_IMAGES, QUESTIONS

ROUTED = (
    "llava_next",
    "llava_onevision",
    "internvl",
    "idefics3",
    "smolvlm",
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_5",
)
LAYERS = {"default": [1, 2, 4, 6], "qwen3_5": [1, 3, 5, 7]}  # Qwen3.5 scores at full attention
KEEP = [0.5, 0.5, 0.25, 0.125]


@cache
def _model(family: str, attn: str = "sdpa"):
    return tiny_family_model(family, attn_implementation=attn)


@cache
def _inputs(family: str, sample: int | None = None) -> dict[str, torch.Tensor]:
    """The default two-prompt batch, or prompt ``sample`` of it encoded alone."""
    if sample is None:
        return tiny_family_inputs(family)
    sizes = DEFAULT_IMAGES[_FORMAT_OF[family]][sample]
    return tiny_family_inputs(family, sizes=(sizes,), questions=(QUESTIONS[sample],))


def _method(family: str) -> PDrop:
    return PDrop(layers=LAYERS.get(family, LAYERS["default"]), keep=KEEP, reroute=True)


def _image_features(model, inputs) -> list[torch.Tensor]:
    """Per image, the features the model's own vision path places on its image tokens."""
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
    return list(captured[0].pooler_output)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_llava_next_layout_is_the_models_packing(family):
    """Per image: as many tokens as the model packs features for, newlines exactly where the
    model put ``image_newline``, the base view first; the layout read from the features (what
    ``generate()`` passes) equals the one computed from ``image_sizes``."""
    model, inputs = _model(family), _inputs(family)
    adapter = adapter_for(model)
    features = _image_features(model, inputs)
    ids = adapter.image_ids(inputs["input_ids"], inputs)
    assert torch.bincount(ids[ids >= 0]).tolist() == [f.shape[0] for f in features]
    layouts = [layout for sample in adapter.image_layouts(ids, inputs) for layout in sample]
    newline = model.model.image_newline
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for layout, feature in zip(layouts, features, strict=True):
        rows = (feature == newline).all(dim=-1).nonzero().flatten().tolist()
        assert list(layout.extras) == rows and rows and rows[0] >= side * side
        assert (layout.views[0].rows, layout.views[0].cols) == (side, side)
    encoded = {"image": type("Encoded", (), {"pooler_output": features})()}
    from_features = adapter.image_layouts(ids, {"mm_encoder_outputs": encoded})
    assert from_features == adapter.image_layouts(ids, inputs)
    if family == "llava_onevision":  # the two-image prompt gets base views + one newline each
        assert [len(layout.views) for layout in layouts] == [2, 1, 1]


def _processor_images(family: str) -> list:
    """The default batch's images, as ``tiny_family_inputs`` draws them."""
    sizes = DEFAULT_IMAGES[_FORMAT_OF[family]]
    return [random_image(h, w, 7919 * h + w) for row in sizes for h, w in row]


def test_internvl_images_are_their_tiles_and_thumbnail():
    """Per image: the image processor's tile count (``num_patches``); tiles first, the whole-image
    thumbnail last."""
    model, inputs = _model("internvl"), _inputs("internvl")
    adapter = adapter_for(model)
    processor = tiny_family_processor("internvl").image_processor
    tiles = processor(images=_processor_images("internvl"), return_tensors="pt")["num_patches"].tolist()
    ids = adapter.image_ids(inputs["input_ids"], inputs)
    layouts = [layout for sample in adapter.image_layouts(ids, inputs) for layout in sample]
    assert [len(layout.views) for layout in layouts] == tiles and max(tiles) > 1
    for layout in layouts:
        assert layout.views[-1].box == (0.0, 0.0, 1.0, 1.0) and layout.views[-1].cells == 16
        assert all(view.box is None for view in layout.views[:-1])


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_tiles_form_one_image_in_the_processors_grid(family):
    """Per image: ``rows × cols`` tiles (the image processor's split) placed row-major, then the
    global view; the text between tiles is not visual and belongs to no image."""
    model, inputs = _model(family), _inputs(family)
    adapter = adapter_for(model)
    processor = tiny_family_processor(family).image_processor
    nested = [[random_image(h, w, 7919 * h + w) for h, w in row] for row in DEFAULT_IMAGES["idefics"]]
    split = processor(images=nested, return_tensors="pt", return_row_col_info=True)
    grids = [
        (r, c)
        for rows, cols in zip(split["rows"], split["cols"], strict=True)
        for r, c in zip(rows, cols, strict=True)
    ]
    ids = adapter.image_ids(inputs["input_ids"], inputs)
    layouts = [layout for sample in adapter.image_layouts(ids, inputs) for layout in sample]
    assert len(layouts) == len(grids) == 3
    for layout, (rows, cols) in zip(layouts, grids, strict=True):
        assert len(layout.views) == rows * cols + 1 and layout.length == 16 * (rows * cols + 1)
        boxes = [view.box for view in layout.views]
        expected = [
            (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)
        ]
        assert boxes == [*expected, (0.0, 0.0, 1.0, 1.0)]
        inside = ids[layout.sample, layout.span[0] : layout.span[1]]
        assert (inside == -1).any() and set(inside.tolist()) == {-1, int(inside.max())}


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_scores_are_the_models_own_eager_attention_row(family):
    """The router's scores (q/k norms, interleaved MRoPE, GQA; Qwen3.5's gated queries and partial
    RoPE) equal the attention row of the last prompt token that the untouched model's eager
    attention returns, at several layers."""
    model, inputs = _model(family, "eager"), _inputs(family, 0)
    attentions = model(**inputs, output_attentions=True).attentions
    if family == "qwen3_5":  # only full-attention layers return attention weights
        attentions = dict(zip((1, 3, 5, 7), [a for a in attentions if a is not None], strict=True))
    visual = inputs["input_ids"][0] == IMAGE_TOKEN
    for layer in (1, 3, 5):
        with FastV(layer=layer, keep=1.0)(model) as trace:
            model(**inputs)
        row = attentions[layer][0, :, -1].float().mean(0)[visual]
        torch.testing.assert_close(trace.decisions[0].scores[0], row, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layers", [(1, 2), (1, 3), (4, 6)], ids=["inside", "across", "after"])
def test_qwen3_vl_deepstack_rows_follow_the_tokens_that_run_the_layer(layers):
    """DeepStack levels are added after layers 0, 1, 2. With decisions inside, across and after
    them, routed logits and every decision's scores equal the reference, which adds each level to
    the visual tokens present in that layer only: a deferred token comes back without the levels
    of the layers it skipped (a token deferred at the first decision re-enters at the second)."""
    model, inputs = _model("qwen3_vl"), _inputs("qwen3_vl", 1)
    method = PDrop(layers=list(layers), keep=[0.25, 0.25], reroute=True)
    with method(model) as trace:
        logits = model(**inputs).logits[0]
    assert sum(trace.decisions[1].reentered) > 0
    selected = [d.selected[0] for d in trace.decisions]
    ref, scores = routed_reference(model, inputs, list(layers), selected, True)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-5, atol=1e-5)
    for decision, expected in zip(trace.decisions, scores, strict=True):
        torch.testing.assert_close(decision.scores[0], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ROUTED)
def test_mixed_batch_equals_one_by_one_and_decodes(family, attn):
    """Left-padded batch of one and two images of different sizes: each prompt's logits,
    decisions and KV lengths equal its own run; greedy decoding equals the reference decoder."""
    model = _model(family, attn)
    inputs = _inputs(family)
    method = _method(family)
    with method(model) as trace:
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    batch_decisions = trace.decisions
    width = inputs["input_ids"].shape[1]
    for b in range(2):
        alone = _inputs(family, b)
        n_visual = int((alone["input_ids"] == IMAGE_TOKEN).sum())
        with method(model) as trace:
            cache_alone = model(**alone, use_cache=True).past_key_values
        selected = [d.selected[0] for d in trace.decisions]
        for d_batch, chosen in zip(batch_decisions, selected, strict=True):
            assert torch.equal(d_batch.selected[b], chosen)
        n_text = alone["input_ids"].shape[1] - n_visual
        recurrent = adapter_for(model).recurrent_layers
        per_layer = enumerate(trace.tokens_per_layer(8))
        assert kv_lengths(cache_alone) == [None if i in recurrent else n_text + v for i, v in per_layer]
        new = out.sequences[b, width:]
        ref, _ = routed_reference(model, alone, list(method.layers), selected, True, extra_ids=new[:-1])
        n = alone["input_ids"].shape[1]
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits[b], ref[n - 1 + step], rtol=1e-4, atol=1e-4)
