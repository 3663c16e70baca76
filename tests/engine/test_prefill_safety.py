"""A prefill is never silently wrong: the trace only ever shows a complete prefill, the scoring query
is never routed away, embeddings route or are refused, and a routed cache is only continued where
its stage layouts are known."""

from __future__ import annotations

import pytest
import torch
from conftest import model_for
from reference import embeddings_and_positions, routed_reference

from vlm_reroute import PDrop, Random
from vlm_reroute.testing.models import tiny_inputs

LAYERS, KEEP = [1, 2, 4, 6], [64, 64, 32, 16]
METHOD = PDrop(layers=LAYERS, keep=KEEP, reroute=True)


def test_failed_prefill_keeps_the_previous_trace(family):
    model = model_for(family)
    first, second = tiny_inputs(model, (10,), seed=1), tiny_inputs(model, (7,), seed=2)

    def fail(module, args):
        raise RuntimeError("a layer failed")

    with METHOD(model) as trace:
        model(**first)
        before = [d.selected[0].clone() for d in trace.decisions]
        handle = model.model.language_model.layers[5].register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="a layer failed") as info:
                model(**second)
        finally:
            handle.remove()
        assert trace.prefills == 1
        assert len(trace.decisions) == len(before)
        assert all(torch.equal(a, d.selected[0]) for a, d in zip(before, trace.decisions, strict=True))
    assert any("previous complete prefill" in note for note in getattr(info.value, "__notes__", []))


def _ends_with_image(model, family: str) -> dict:
    """A prompt whose last token is an image token (the image is the end of the prompt)."""
    inputs = tiny_inputs(model, (0,) if family == "llava" else (3,), seed=9)
    if family == "llava":
        return inputs
    last = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero().max())
    per_token = ("input_ids", "attention_mask", "mm_token_type_ids")
    return {k: v[:, : last + 1] if k in per_token else v for k, v in inputs.items()}


@pytest.mark.parametrize("reroute", [False, True])
def test_scoring_query_is_never_routed(family, reroute):
    """Random scores would defer or remove the last (visual) token; it is kept in every stage and
    the logits equal the reference's with the recorded decisions."""
    model = model_for(family)
    inputs = _ends_with_image(model, family)
    assert int(inputs["input_ids"][0, -1]) == model.config.image_token_id
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    keep = [8, 8, 4, 2] if reroute else [8, 6, 4, 2]
    with Random(layers=LAYERS, keep=keep, reroute=reroute, seed=3)(model) as trace:
        logits = model(**inputs).logits[0]
    selected = [d.selected[0] for d in trace.decisions]
    assert [s.numel() for s in selected] == keep
    assert all(int(s[-1]) == n_visual - 1 for s in selected)
    ref, _ = routed_reference(model, inputs, LAYERS, selected, reroute)
    torch.testing.assert_close(logits[-1], ref[-1], rtol=1e-4, atol=1e-4)


def test_merged_embeddings_route_when_spans_are_known():
    """Qwen: ``mm_token_type_ids`` and the 3-D positions locate and lay out the images, so merged
    ``inputs_embeds`` without pixels route exactly as the ids with pixels do."""
    model = model_for("qwen2_5_vl")
    inputs = tiny_inputs(model, (10,), seed=4)
    embeds, _ = embeddings_and_positions(model, inputs)
    position_ids = model.model.compute_3d_position_ids(
        input_ids=inputs["input_ids"],
        inputs_embeds=embeds,
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=None,
        attention_mask=inputs["attention_mask"],
        past_key_values=None,
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    with METHOD(model) as trace:
        by_ids = model(**inputs).logits
        ids_decisions = [d.selected[0] for d in trace.decisions]
        by_embeds = model(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            position_ids=position_ids,
        ).logits
        assert trace.prefills == 2
        assert all(torch.equal(a, d.selected[0]) for a, d in zip(ids_decisions, trace.decisions, strict=True))
    torch.testing.assert_close(by_embeds, by_ids, rtol=1e-4, atol=1e-4)


def test_merged_embeddings_without_locator_are_refused():
    """LLaVA: merged embeddings carry no trace of where the image was: refuse, never run unrouted."""
    model = model_for("llava")
    inputs = tiny_inputs(model, (10,))
    embeds, _ = embeddings_and_positions(model, inputs)
    with METHOD(model) as trace, pytest.raises(ValueError, match=r"inputs_embeds.*cannot locate the image"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    assert trace.prefills == 0


def test_routed_cache_outside_its_block_is_refused(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (10,))
    with METHOD(model):
        out = model(**inputs)
    token = out.logits[:, -1:].argmax(-1)
    cache = out.past_key_values
    with pytest.raises(RuntimeError, match=r"routed prefill.*block has ended"):
        model(input_ids=token, past_key_values=cache)
    with METHOD(model), pytest.raises(RuntimeError, match=r"routed prefill.*block has ended"):
        model(input_ids=token, past_key_values=cache)
