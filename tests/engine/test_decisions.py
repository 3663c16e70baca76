"""What is decided: prune never brings a token back, reroute does; decisions do not depend on the
attention implementation; no state leaks from one prompt to the next."""

from __future__ import annotations

import pytest
import torch
from conftest import model_for

from vlm_reroute import FastV, PDrop
from vlm_reroute.testing.models import tiny_inputs

LAYERS = [1, 2, 4, 6]


def test_prune_is_monotonic(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    with PDrop(layers=LAYERS, keep=[128, 64, 32, 16])(model) as trace:
        model(**inputs)
    sets = [set(d.selected[0].tolist()) for d in trace.decisions]
    assert [len(s) for s in sets] == [128, 64, 32, 16]
    assert all(later <= earlier for earlier, later in zip(sets, sets[1:], strict=False))
    assert all(d.reentered == [0] for d in trace.decisions)


def test_reroute_readmits_deferred_tokens(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    with PDrop(layers=LAYERS, keep=[64, 64, 32, 16], reroute=True)(model) as trace:
        model(**inputs)
    sets = [set(d.selected[0].tolist()) for d in trace.decisions]
    counted = [len(now - before) for before, now in zip(sets, sets[1:], strict=False)]
    assert [d.reentered[0] for d in trace.decisions[1:]] == counted
    assert sum(counted) > 0  # deferred tokens did come back on this model
    deferred_then_back = sets[2] - sets[1]
    assert deferred_then_back  # some were out at stage 2 and in again at stage 3


def test_eager_and_sdpa_decide_the_same(family):
    inputs = tiny_inputs(model_for(family), (20, 11), seed=4)
    decisions = {}
    for attn in ("eager", "sdpa"):
        model = model_for(family, attn=attn)
        with PDrop(layers=LAYERS, keep=[64, 64, 32, 16], reroute=True)(model) as trace:
            logits = model(**inputs).logits[:, -1]
        decisions[attn] = (trace.decisions, logits)
    (d_eager, l_eager), (d_sdpa, l_sdpa) = decisions["eager"], decisions["sdpa"]
    for a, b in zip(d_eager, d_sdpa, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.selected, b.selected, strict=True))
    torch.testing.assert_close(l_eager, l_sdpa, rtol=1e-4, atol=1e-4)


def test_no_stale_state_between_prompts(family):
    model = model_for(family)
    image_a = tiny_inputs(model, (20,), seed=21)
    image_b = tiny_inputs(model, (17,), seed=22)
    text_ids = image_a["input_ids"][:, -12:]
    text = {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)}
    vanilla_text = model(**text).logits
    vanilla_text_gen = model.generate(**text, max_new_tokens=4, do_sample=False)
    method = PDrop(layers=LAYERS, keep=[64, 64, 32, 16], reroute=True)
    with method(model) as fresh:
        fresh_b = model(**image_b).logits
    with method(model) as trace:
        model.generate(**image_a, max_new_tokens=2, do_sample=False)
        assert torch.equal(model(**text).logits, vanilla_text)
        assert torch.equal(model.generate(**text, max_new_tokens=4, do_sample=False), vanilla_text_gen)
        again_b = model(**image_b).logits
        assert trace.prefills == 2  # image_a (generate) and image_b; text-only runs are not routed
    assert torch.equal(again_b, fresh_b)
    for a, b in zip(trace.decisions, fresh.decisions, strict=True):
        assert torch.equal(a.selected[0], b.selected[0])


def test_tokens_per_layer(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    with FastV(layer=3, keep=0.25)(model) as trace:
        model(**inputs)
    assert trace.tokens_per_layer(8) == [576] * 3 + [144] * 5


def test_a_failed_prefill_leaves_no_state(family):
    """An error inside the routed forward registers nothing; the next prompt routes afresh."""
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    method = PDrop(layers=LAYERS, keep=[64, 64, 32, 16], reroute=True)
    with method(model) as fresh:
        expected = model(**inputs).logits

    def boom(module, args):
        raise RuntimeError("layer failed")

    with method(model) as trace:
        handle = model.model.language_model.layers[3].register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="layer failed"):
                model(**inputs)
        finally:
            handle.remove()
        assert trace.prefills == 0 and trace.decisions == []
        assert torch.equal(model(**inputs).logits, expected)
        assert trace.prefills == 1
    assert [d.layer for d in trace.decisions] == [d.layer for d in fresh.decisions] == LAYERS
    for a, b in zip(trace.decisions, fresh.decisions, strict=True):
        assert torch.equal(a.selected[0], b.selected[0])


def test_ties_go_to_the_earlier_token_for_equal_and_unequal_images():
    """Both selection paths (equal image sizes, and mixed sizes) break ties the same way."""
    from vlm_reroute.scoring.selection import top_k_per_image

    scores = torch.zeros(1, 10)
    scores[0, 7] = 1.0
    candidates = torch.ones(1, 10, dtype=torch.bool)
    equal = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    picked = top_k_per_image(scores, candidates, equal, torch.tensor([2, 2]))
    assert picked[0].nonzero().flatten().tolist() == [0, 1, 5, 7]
    unequal = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    picked = top_k_per_image(scores, candidates, unequal, torch.tensor([2, 2]))
    assert picked[0].nonzero().flatten().tolist() == [0, 1, 4, 7]
