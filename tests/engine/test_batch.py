"""Each sample gets its own decision: a batch equals its prompts run one by one; every image of a
prompt is routed with its own count."""

from __future__ import annotations

import pytest
import torch
from conftest import merge_samples, model_for

from vlm_reroute import PDrop
from vlm_reroute.testing.models import tiny_inputs

LAYERS = [1, 2, 4, 6]


def test_samples_decide_differently(family):
    """Sample 0's decision is not applied to sample 1 (fault 1 of the published code)."""
    model = model_for(family)
    inputs = tiny_inputs(model, (20, 20), seed=12)
    with PDrop(layers=[2], keep=[32])(model) as trace:
        model(**inputs)
    first, second = trace.decisions[0].selected
    assert not torch.equal(first, second)


@pytest.mark.parametrize("reroute", [False, True])
def test_multi_image_prompts_and_uneven_batches(family, reroute):
    """Two images in one prompt: each keeps its own count. Batched with a one-image prompt, the
    stages have different lengths per sample (fillers) and still equal the one-by-one runs."""
    model = model_for(family)
    two = tiny_inputs(model, (8,), images_per_prompt=2, seed=13)
    one = tiny_inputs(model, (30,), images_per_prompt=1, seed=14)
    method = PDrop(
        layers=LAYERS, keep=[0.25, 0.125, 0.0625, 0.03125] if reroute else [96, 64, 32, 16], reroute=reroute
    )
    with method(model) as trace:
        alone_two = model(**two).logits[0, -1]
    per_image = 144 if reroute else 96
    first = trace.decisions[0].selected[0]
    assert first.numel() == 2 * per_image
    assert int((first < 576).sum()) == per_image and int((first >= 576).sum()) == per_image
    decisions_two = trace.decisions
    with method(model) as trace:
        alone_one = model(**one).logits[0, -1]
    decisions_one = trace.decisions
    batch = merge_samples(model, two, one)
    with method(model) as trace:
        out = model(**batch)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(out.logits[0, -1], alone_two, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1, -1], alone_one, rtol=1e-4, atol=1e-4)
    assert [d.layer for d in trace.decisions] == LAYERS
    for d, d2, d1 in zip(trace.decisions, decisions_two, decisions_one, strict=True):
        assert torch.equal(d.selected[0], d2.selected[0])
        assert torch.equal(d.selected[1], d1.selected[0])
    with method(model):  # every sample of the batched generate equals its prompt generated alone
        gen_two = model.generate(**two, max_new_tokens=3, do_sample=False)
        gen_one = model.generate(**one, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2
    assert torch.equal(generated[0, -3:], gen_two[0, -3:])
    assert torch.equal(generated[1, -3:], gen_one[0, -3:])
