"""Every ``generate()`` mode inside a block routes exactly or is refused at its first call.

Routed: greedy and sampling (elsewhere), beam search with ``num_return_sequences`` (scores checked
against the reference), assisted generation and prompt lookup (the same tokens as plain routed
greedy: decisions from the prompt alone, drafts decoded against the routed cache),
``use_cache=False`` (the same tokens as the cached routed generate, decisions made once) and
continuing a routed cache of the same block. Refused: the modes transformers moved to the Hub
(contrastive search, DoLa, group and constrained beam search), ``custom_generate`` and caches
filled outside the block.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from conftest import model_for
from reference import routed_reference
from transformers.generation.utils import GenerateDecoderOnlyOutput

from vlm_reroute import PDrop
from vlm_reroute.testing.models import VOCAB, tiny_inputs, tiny_model

FAMILIES = ("llava", "qwen2_5_vl")
LAYERS, KEEP = [1, 2, 4, 6], [64, 64, 32, 16]
METHOD = PDrop(layers=LAYERS, keep=KEEP, reroute=True)
GREEDY = dict(max_new_tokens=6, do_sample=False)


@cache
def assistant_for(family: str):
    """A draft model of the same family and vocabulary (other weights), never routed."""
    return tiny_model(family, seed=1)


def _sequence_inputs(inputs: dict, keep: int) -> dict:
    """The first ``keep`` positions of every per-token input (images untouched)."""
    per_token = ("input_ids", "attention_mask", "mm_token_type_ids")
    return {k: v[:, :keep] if k in per_token else v for k, v in inputs.items()}


def _oracle(assistant, script: torch.Tensor):
    """``assistant`` drafting from a known continuation: two right tokens then a wrong one, so every
    step accepts drafts, rejects one and crops the routed cache."""

    def generate(input_ids, max_new_tokens, **kwargs):
        n, k = input_ids.shape[1], min(3, max_new_tokens)
        drafts = script[:, n : n + k].clone()
        if k == 3:
            drafts[:, -1] = (drafts[:, -1] + 1) % VOCAB
        scores = tuple(torch.zeros(1, VOCAB) for _ in range(drafts.shape[1]))
        sequences = torch.cat([input_ids, drafts], dim=1)
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, past_key_values=None)

    assistant.__dict__["generate"] = generate
    return assistant


@pytest.mark.parametrize("family", FAMILIES)
def test_assisted_generation_equals_plain_greedy(family):
    """The target's first forward is the prompt plus drafts: decisions come from the prompt alone,
    accepted drafts are decoded against the routed cache and rejected ones cropped from it."""
    model = model_for(family)
    inputs = tiny_inputs(model, (12,), seed=3)
    with METHOD(model) as trace:
        plain = model.generate(**inputs, **GREEDY)
        decided = [d.selected[0] for d in trace.decisions]
        oracle = _oracle(tiny_model(family, seed=1), plain)
        assisted = model.generate(**inputs, assistant_model=oracle, **GREEDY)
        assert trace.prefills == 2  # one per generate: draft tokens never start a prefill
        assert all(torch.equal(a, d.selected[0]) for a, d in zip(decided, trace.decisions, strict=True))
        if family == "llava":  # a real draft model too (its drafts mostly rejected)
            assert torch.equal(
                model.generate(**inputs, assistant_model=assistant_for(family), **GREEDY), plain
            )
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_equals_plain_greedy(family):
    """The prompt ends with a 3-gram of its question, so lookup drafts tokens (the old engine scored
    the first forward from a draft token and crashed on the crop)."""
    model = model_for(family)
    inputs = tiny_inputs(model, (14,), seed=4)
    ids = inputs["input_ids"].clone()
    ids[:, -3:] = ids[:, -11:-8]
    inputs["input_ids"] = ids
    with METHOD(model) as trace:
        plain = model.generate(**inputs, **GREEDY)
        looked_up = model.generate(**inputs, prompt_lookup_num_tokens=3, **GREEDY)
        assert trace.prefills == 2
    assert torch.equal(looked_up, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_cache_equals_cached(family):
    """``use_cache=False`` re-runs the whole sequence every step: the decisions are made once, from
    the prompt, and reused, so the tokens equal the cached routed generate (as vanilla's do)."""
    model = model_for(family)
    inputs = tiny_inputs(model, (12,), seed=5)
    steps = dict(max_new_tokens=4, do_sample=False)
    with METHOD(model) as trace:
        cached = model.generate(**inputs, **steps)
        decided = [d.selected[0] for d in trace.decisions]
        uncached = model.generate(**inputs, use_cache=False, **steps)
        assert trace.prefills == 2
        assert all(torch.equal(a, d.selected[0]) for a, d in zip(decided, trace.decisions, strict=True))
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_with_return_sequences_matches_reference(family):
    """Each returned beam's score (sum of log-probabilities, ``length_penalty=0``) equals the score
    of the same tokens under the independent reference with the recorded decisions."""
    model = model_for(family)
    inputs = tiny_inputs(model, (12,), seed=6)
    n = inputs["input_ids"].shape[1]
    with METHOD(model) as trace:
        out = model.generate(
            **inputs,
            max_new_tokens=3,
            num_beams=3,
            num_return_sequences=2,
            length_penalty=0.0,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (2, n + 3)
    selected = [d.selected[0] for d in trace.decisions]
    assert all(torch.equal(d.selected[b], d.selected[0]) for d in trace.decisions for b in range(3))
    for sequence, score in zip(out.sequences, out.sequences_scores, strict=True):
        new = sequence[n:]
        logits, _ = routed_reference(model, inputs, LAYERS, selected, True, extra_ids=new[:-1])
        logprobs = logits[n - 1 :].float().log_softmax(dim=-1)
        expected = logprobs[torch.arange(3), new].sum()
        torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("contrastive search", dict(penalty_alpha=0.6, top_k=4)),
        ("DoLa", dict(dola_layers="high")),
        ("group beam search", dict(num_beams=2, num_beam_groups=2, diversity_penalty=1.0)),
        ("constrained beam search", dict(num_beams=2, force_words_ids=[[5]])),
        ("early-exit assisted generation", dict(assistant_early_exit=2)),
    ],
)
def test_unsupported_modes_are_refused(mode, settings):
    model = model_for("llava")
    inputs = tiny_inputs(model, (4,))
    with METHOD(model) as trace, pytest.raises(ValueError, match=rf"{mode}.*not supported.*supported are"):
        model.generate(**inputs, max_new_tokens=2, **settings)
    assert trace.prefills == 0


def test_custom_generate_is_refused_before_it_runs():
    model = model_for("llava")
    inputs = tiny_inputs(model, (4,))
    called = []

    def loop(model, input_ids, *args, **kwargs):
        called.append(True)
        return input_ids

    with METHOD(model), pytest.raises(ValueError, match=r"custom_generate.*not supported"):
        model.generate(**inputs, max_new_tokens=2, custom_generate=loop)
    assert not called


def test_assistant_that_is_the_routed_model_is_refused():
    model = model_for("llava")
    inputs = tiny_inputs(model, (4,))
    with METHOD(model), pytest.raises(ValueError, match=r"assistant_model.*the routed model itself"):
        model.generate(**inputs, max_new_tokens=2, assistant_model=model)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_a_cache_filled_outside_the_block_is_refused(family):
    """A vanilla cache that holds the image, continued with text: the image was never routed, and
    the text would run unrouted without a word."""
    model = model_for(family)
    inputs = tiny_inputs(model, (12,))
    prefix = _sequence_inputs(inputs, inputs["input_ids"].shape[1] - 4)
    cache = model(**prefix).past_key_values
    with METHOD(model) as trace, pytest.raises(ValueError, match=r"past_key_values.*not filled.*this block"):
        model.generate(input_ids=inputs["input_ids"], past_key_values=cache, max_new_tokens=2)
    assert trace.prefills == 0


def test_generate_continues_a_routed_cache_of_its_block():
    model = model_for("llava")
    inputs = tiny_inputs(model, (12,), seed=8)
    with METHOD(model) as trace:
        whole = model.generate(**inputs, **GREEDY)
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        more = model.generate(
            input_ids=first.sequences,
            past_key_values=first.past_key_values,
            max_new_tokens=3,
            do_sample=False,
        )
        assert trace.prefills == 2
    assert torch.equal(more, whole)
