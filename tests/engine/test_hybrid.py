"""Routing on a hybrid decoder (Qwen3.5: Gated DeltaNet linear-attention layers between full-attention
layers; ``docs/hybrid.md``).

A deferred or removed token skips the linear-attention layers of its stage as well: their
convolution window and recurrent state must be what the stage's tokens, in order, leave behind.
The reference (``reference.py``) runs every layer by hand on the shortened sequence with a fresh
cache; the routed cache must hold the same state, layer by layer.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from reference import routed_reference
from transformers.cache_utils import DynamicCache, LinearAttentionLayer

from vlm_reroute import FastV, PDrop
from vlm_reroute.adapters import adapter_for
from vlm_reroute.testing.families import tiny_family_inputs, tiny_family_model
from vlm_reroute.testing.family_inputs import DEFAULT_IMAGES

FULL = [1, 3, 5, 7]  # the tiny model alternates linear (even) and full-attention (odd) layers


@cache
def _model():
    return tiny_family_model("qwen3_5")


@cache
def _inputs():
    return tiny_family_inputs("qwen3_5", sizes=(DEFAULT_IMAGES["qwen"][1],), questions=("Compare them.",))


def test_decisions_are_scored_at_full_attention_layers_only():
    model = _model()
    assert adapter_for(model).allowed_decision_layers() == tuple(FULL)
    with (
        pytest.raises(
            ValueError, match=r"decision layers \[2, 4\].*allowed decision layers are \[1, 3, 5, 7\]"
        ),
        PDrop(layers=[1, 2, 4], keep=[0.5, 0.5, 0.25], reroute=True)(model),
    ):
        pass
    # scoring at the layer before the decision: the decision layer follows a full-attention layer
    with (
        pytest.raises(ValueError, match=r"decision layers \[3\].*layer before each.*are \[2, 4, 6\]"),
        FastV(layer=3, keep=0.5, score_from="previous")(model),
    ):
        pass


def test_a_stage_may_start_at_a_linear_attention_layer():
    """FastV's original convention (layer 3's attention decides layer 4) on Qwen3.5: the stage starts
    at a linear-attention layer; logits, scores and the decoded tokens follow the reference."""
    model, inputs = _model(), _inputs()
    method = FastV(layer=4, keep=0.25, score_from="previous")
    with method(model) as trace:
        logits = model(**inputs).logits[0, -1]
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    selected = [trace.decisions[0].selected[0]]
    n = inputs["input_ids"].shape[1]
    ref, _ = routed_reference(
        model, inputs, [4], selected, False, score_from="previous", extra_ids=out.sequences[0, n:-1]
    )
    torch.testing.assert_close(logits, ref[n - 1], rtol=1e-4, atol=1e-4)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], ref[n - 1 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reroute", [False, True])
def test_linear_attention_state_holds_exactly_the_stage_tokens(reroute):
    """Per layer, the routed cache equals the reference's: keys/values of full-attention layers,
    the convolution window and the recurrent state of linear-attention layers; the linear states
    differ from the untouched model's (the deferred tokens really skipped those layers)."""
    model, inputs = _model(), _inputs()
    keep = [0.5, 0.5, 0.25, 0.125] if reroute else [0.5, 0.25, 0.125, 0.0625]
    with PDrop(layers=FULL, keep=keep, reroute=reroute)(model) as trace:
        routed = model(**inputs, use_cache=True).past_key_values
    if reroute:
        assert sum(trace.decisions[2].reentered) > 0
    vanilla = model(**inputs, use_cache=True).past_key_values
    reference = DynamicCache(config=model.config.text_config)
    selected = [d.selected[0] for d in trace.decisions]
    routed_reference(model, inputs, FULL, selected, reroute, cache=reference)
    for i, (mine, ref, plain) in enumerate(zip(routed.layers, reference.layers, vanilla.layers, strict=True)):
        if isinstance(mine, LinearAttentionLayer):
            for state in ("conv_states", "recurrent_states"):
                torch.testing.assert_close(
                    getattr(mine, state)[0], getattr(ref, state)[0], rtol=1e-4, atol=1e-5
                )
            if i > FULL[0]:
                assert not torch.allclose(mine.recurrent_states[0], plain.recurrent_states[0], atol=1e-3)
        else:
            torch.testing.assert_close(mine.keys, ref.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.values, ref.values, rtol=1e-4, atol=1e-5)


def test_the_cache_reports_the_full_length_when_its_length_layer_is_routed():
    """``Cache.get_seq_length()`` answers for the first full-attention layer (1 here). After a
    decision there it reports the full prompt length (each layer keeps its own real length), so a
    hand-written decoding step without position ids or mask is numbered right: its logits equal
    the reference decoder's."""
    model, inputs = _model(), _inputs()
    n = inputs["input_ids"].shape[1]
    with PDrop(layers=FULL, keep=[0.5, 0.5, 0.25, 0.125], reroute=True)(model) as trace:
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        assert cache.get_seq_length() == n and cache.get_seq_length(1) < n
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=token, past_key_values=cache).logits[0, -1]
    selected = [d.selected[0] for d in trace.decisions]
    ref, _ = routed_reference(model, inputs, FULL, selected, True, extra_ids=token[0])
    torch.testing.assert_close(step, ref[-1], rtol=1e-4, atol=1e-4)
