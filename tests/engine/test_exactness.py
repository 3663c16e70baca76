"""Routing is exact: full keep is the untouched model, and routed runs match a slow reference."""

from __future__ import annotations

import pytest
import torch
from conftest import hook_count, model_for
from reference import routed_reference

from vlm_reroute import FastV, PDrop
from vlm_reroute.testing.models import tiny_inputs

ALL = [1.0, 1.0, 1.0, 1.0]


def test_exit_restores_the_model(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    before = model(**inputs).logits
    hooks_before = hook_count(model)
    with PDrop(layers=[2, 5], keep=[32, 8], reroute=True)(model):
        routed = model(**inputs).logits
    assert not torch.equal(before, routed)  # routing did change the computation
    assert hook_count(model) == hooks_before
    assert torch.equal(model(**inputs).logits, before)


def test_exit_restores_after_an_error(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    before = model(**inputs).logits
    with pytest.raises(KeyError), PDrop(layers=[2, 5], keep=[32, 8])(model):
        model(**inputs)
        raise KeyError("user code failed")
    assert torch.equal(model(**inputs).logits, before)


def test_scores_equal_the_models_eager_attention_row(family):
    """At the first decision the router's scores are the model's own attention of the last token."""
    model = model_for(family, attn="eager")
    inputs = tiny_inputs(model, (20,), seed=1)
    layer = 3
    out = model(**inputs, output_attentions=True)
    row = out.attentions[layer][0, :, -1].mean(0)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    with FastV(layer=layer, keep=64)(model) as trace:
        model(**inputs)
    torch.testing.assert_close(trace.decisions[0].scores[0], row[visual], rtol=1e-5, atol=1e-7)


def test_previous_layer_convention_uses_layer_l_minus_1(family):
    """score_from='previous': layer l-1's attention decides layer l (original FastV)."""
    model = model_for(family, attn="eager")
    inputs = tiny_inputs(model, (20,), seed=1)
    out = model(**inputs, output_attentions=True)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    with FastV(layer=3, keep=64, score_from="previous")(model) as trace:
        model(**inputs)
    decision = trace.decisions[0]
    assert decision.layer == 3
    torch.testing.assert_close(decision.scores[0], out.attentions[2][0, :, -1].mean(0)[visual])
    expected = out.attentions[2][0, :, -1].mean(0)[visual].topk(64).indices.sort().values
    assert torch.equal(decision.selected[0], expected)


@pytest.mark.parametrize("reroute", [False, True])
def test_previous_convention_matches_reference(family, reroute):
    """Under 'previous', decision l scores the sequence entering layer l-1 (deferred tokens with
    their carried states under reroute) with layer l-1's projections."""
    model = model_for(family)
    inputs = tiny_inputs(model, (20,), seed=2)
    method = PDrop(
        layers=[2, 5, 6],
        keep=[64, 64, 32] if reroute else [96, 64, 32],
        reroute=reroute,
        score_from="previous",
    )
    with method(model) as trace:
        logits = model(**inputs).logits[0, -1]
    selected = [d.selected[0] for d in trace.decisions]
    ref_logits, ref_scores = routed_reference(
        model, inputs, method.layers, selected, reroute, score_from="previous"
    )
    torch.testing.assert_close(logits, ref_logits[-1], rtol=1e-5, atol=1e-5)
    for decision, scores in zip(trace.decisions, ref_scores, strict=True):
        torch.testing.assert_close(decision.scores[0], scores, rtol=1e-4, atol=1e-7)
