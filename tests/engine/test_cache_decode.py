"""KV cache holds exactly the routed tokens; decoding continues the full numbering and is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import model_for, split_sample
from reference import routed_reference

from vlm_reroute import FastV, PDrop, kv_lengths
from vlm_reroute.testing.models import tiny_inputs

LAYERS, KEEP = [1, 2, 4, 6], [64, 64, 32, 16]


@pytest.mark.parametrize("reroute", [False, True])
def test_kv_lengths_follow_the_schedule(family, reroute):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    n = inputs["input_ids"].shape[1]
    text = n - 576
    with PDrop(layers=LAYERS, keep=[96, 64, 32, 16], reroute=reroute)(model):
        out = model(**inputs)
    expected = [n] + [text + 96] + [text + 64] * 2 + [text + 32] * 2 + [text + 16] * 2
    assert kv_lengths(out.past_key_values) == expected


def test_fastv_kv_lengths(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))
    n = inputs["input_ids"].shape[1]
    with FastV(layer=3, keep=0.25)(model) as trace:
        out = model(**inputs)
    assert trace.decisions[0].kept == [144]
    assert kv_lengths(out.past_key_values) == [n] * 3 + [n - 576 + 144] * 5


@pytest.mark.parametrize("reroute", [False, True])
def test_decode_matches_reference(family, reroute):
    """Each generated token's logits equal the reference run over prompt + generated tokens with
    the same decisions: new tokens see, at every layer, exactly that layer's stage tokens, at
    positions continuing the full prompt."""
    model = model_for(family)
    inputs = tiny_inputs(model, (20,), seed=5)
    keep = KEEP if reroute else [96, 64, 32, 16]
    with PDrop(layers=LAYERS, keep=keep, reroute=reroute)(model) as trace:
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    selected = [d.selected[0] for d in trace.decisions]
    ref, _ = routed_reference(model, inputs, LAYERS, selected, reroute, extra_ids=new[:-1])
    n = inputs["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], ref[n - 1 + step], rtol=1e-4, atol=1e-4)


def test_decode_positions_continue_from_full_length(family):
    """The first generated token gets the position it has in the untouched model (N for 1-D RoPE,
    the rope_deltas continuation for MRoPE), not the shortened length."""
    model = model_for(family)
    inputs = tiny_inputs(model, (20,))

    def positions_seen(routed: bool) -> list[torch.Tensor]:
        seen = []

        def grab(module, args, kwargs):
            cos, _ = kwargs["position_embeddings"]
            seen.append(cos[..., -1, :].clone())

        handle = model.model.language_model.layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            if routed:
                with PDrop(layers=LAYERS, keep=KEEP, reroute=True)(model):
                    model.generate(**inputs, max_new_tokens=3, do_sample=False)
            else:
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            handle.remove()
        return seen

    vanilla, routed = positions_seen(False), positions_seen(True)
    for v, r in zip(vanilla[1:], routed[1:], strict=True):  # decode steps
        torch.testing.assert_close(v, r)
    if family == "llava":
        n = inputs["input_ids"].shape[1]
        rotary = model.model.language_model.rotary_emb
        cos, _ = rotary(torch.zeros(1, 1, 64), torch.tensor([[n]]))
        torch.testing.assert_close(routed[1][0], cos[0, 0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sample", [False, True])
def test_generate_batches_with_left_padding(family, attn, sample):
    model = model_for(family, attn=attn)
    inputs = tiny_inputs(model, (20, 9), seed=7)
    with PDrop(layers=LAYERS, keep=KEEP, reroute=True)(model) as trace:
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=5, do_sample=sample, top_k=20)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert [d.kept for d in trace.decisions] == [[64, 64], [64, 64], [32, 32], [16, 16]]
    if not sample:
        for b in range(2):
            single = split_sample(inputs, b)
            with PDrop(layers=LAYERS, keep=KEEP, reroute=True)(model):
                alone = model.generate(**single, max_new_tokens=5, do_sample=False)
            assert torch.equal(alone[0, -5:], out[b, -5:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generate(family, dtype):
    model = model_for(family, dtype=dtype)
    inputs = tiny_inputs(model, (12, 7), grid=16)
    n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    with PDrop(layers=[1, 2, 3], keep=[0.5, 0.5, 0.25], reroute=True)(model) as trace:
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        cache = model(**inputs).past_key_values
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert trace.decisions[-1].kept == [n_visual // 4] * 2
    text = inputs["input_ids"].shape[1] - n_visual
    assert kv_lengths(cache) == [
        text + n_visual,
        text + n_visual // 2,
        text + n_visual // 2,
        text + n_visual // 4,
    ]


def test_interleaved_decoding_of_two_routed_caches():
    """Each routed cache keeps its own stage layouts: decoding one after another prompt's prefill
    (and a text-only call) is still exact. Manual decode loop, no position_ids (1-D RoPE)."""
    model = model_for("llava")
    first, second = tiny_inputs(model, (20,), seed=31), tiny_inputs(model, (9,), seed=32)
    method = PDrop(layers=LAYERS, keep=KEEP, reroute=True)
    with method(model) as trace:
        out_first = model(**first)
        selected = [d.selected[0] for d in trace.decisions]
        model(**second)
        model(input_ids=first["input_ids"][:, -5:])  # text only, unrouted
        token = out_first.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=token, past_key_values=out_first.past_key_values).logits[0, -1]
    ref, _ = routed_reference(model, first, LAYERS, selected, True, extra_ids=token[0])
    torch.testing.assert_close(step, ref[-1], rtol=1e-4, atol=1e-4)
