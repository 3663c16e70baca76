"""Nüwa in the engine: stage 1 before the language model, stage 2 (prune or reroute) inside it.

Checked against an independent reference (``nuwa_reference.py``: the standalone stage-1 functions
and a hand-driven decoder on physically shortened sequences), in prefill and in every decode step,
and against the sanity checks of ``nuwa.md`` §9 that need the language model.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import merge_samples, model_for, small_inputs, small_model_for, split_sample
from nuwa_reference import nuwa_reference, stage1
from nuwa_support import FAMILIES, capture, eager_model, qwen_inputs, stage2_scorer

from vlm_reroute import Nuwa, kv_bytes, kv_lengths
from vlm_reroute.testing.models import IMAGE_TOKEN

# ---- the reference, prefill and decode ---------------------------------------------------------


@pytest.mark.parametrize("official", [False, True], ids=["fixed", "official"])
@pytest.mark.parametrize("reroute", [False, True], ids=["prune", "reroute"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_reference_in_prefill_and_decode(family, reroute, official):
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    n = inputs["input_ids"].shape[1]
    method = Nuwa(k1=24, k2=6, reroute=reroute, official=official)
    with method(model) as trace:
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    record = trace.stage1[0][0]
    anchors, features, _ = stage1(model, inputs, [24], record.n_per_cell, official=official)
    assert torch.equal(record.anchors, anchors[0])
    assert trace.decisions[0].layer == 0 and torch.equal(trace.decisions[0].selected[0], anchors[0])
    stage2 = trace.decisions[1:]
    assert [d.layer for d in stage2] == ([4, 5, 6, 7] if reroute else [4])
    selected = [d.selected[0] for d in stage2]
    ref, ref_scores = nuwa_reference(
        model,
        inputs,
        features,
        anchors,
        [d.layer for d in stage2],
        selected,
        reroute,
        extra_ids=out.sequences[0, n:-1],
        **stage2_scorer(family, official),
    )
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], ref[n - 1 + step], rtol=1e-4, atol=1e-4)
    pool = anchors[0]
    for decision, scores in zip(stage2, ref_scores, strict=True):
        torch.testing.assert_close(decision.scores[0][pool], scores[pool], rtol=1e-4, atol=1e-6)
        best = pool[scores[pool].argsort(descending=True, stable=True)[:6]].sort().values
        assert torch.equal(decision.selected[0], best)
        if not reroute:
            pool = best


def test_official_differs_where_the_release_differs():
    """LLaVA: the aggregated anchors' features (non-convex weights); Qwen: the similarity order of an
    8×8 grid (four windows) and the scoring rows without a causal mask."""
    llava = small_model_for("llava")
    inputs = small_inputs(llava, (20,), seed=3)
    visual = inputs["input_ids"][0] == IMAGE_TOKEN
    rows, anchors = {}, {}
    for flag in (False, True):  # the library's rows entering the language model, each flag
        seen: dict = {}

        def grab(_m, _a, kwargs, seen=seen):
            seen.update(embeds=kwargs["inputs_embeds"])

        hook = llava.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        with Nuwa(k1=24, k2=6, official=flag)(llava) as trace:
            llava(**inputs)
        hook.remove()
        rows[flag], anchors[flag] = seen["embeds"][0, visual], trace.stage1[0][0]
        # each flag against the independent reference of that flag (convex fix / the release's weights)
        ref_anchors, ref_rows, _ = stage1(llava, inputs, [24], anchors[flag].n_per_cell, official=flag)
        assert torch.equal(anchors[flag].anchors, ref_anchors[0])
        torch.testing.assert_close(rows[flag], ref_rows[0], rtol=1e-5, atol=1e-5)
    low = anchors[False].aggregated
    assert bool(low.any()) and torch.equal(low, anchors[True].aggregated)
    at = anchors[False].anchors
    assert torch.equal(rows[False][at[~low]], rows[True][at[~low]])  # kept anchors: identical
    assert not torch.allclose(rows[False][at[low]], rows[True][at[low]])  # aggregated ones: not
    qwen = small_model_for("qwen2_5_vl")
    inputs = small_inputs(qwen, (20,), seed=3)
    scores = {}
    for flag in (False, True):
        with Nuwa(k1=24, k2=6, official=flag)(qwen) as trace:
            qwen(**inputs)
        scores[flag] = trace.decisions[1].scores[0]
    assert not torch.allclose(scores[False], scores[True])


# ---- nuwa.md §9 -------------------------------------------------------------------------------


def test_llava_budget_64_positions_and_counts():
    """Budget 64 on a 24×24 grid: 112 anchors enter at their own positions 5 + p (5 text tokens
    before the image), the first text token after the image keeps 5 + 576, exactly 16 visual tokens
    after the stage-2 layer, text never dropped; the cos/sin each token gets are the untouched
    model's at its position."""
    model = model_for("llava")  # 336 px: 576 tokens, 8 decoder layers: stage 2 from layer 16·8/32 = 4
    inputs = small_inputs(model, (20,), seed=1)
    n = inputs["input_ids"].shape[1]
    text = n - 576
    full_cos, handle = capture(model, 0, "position_embeddings")
    model(**inputs)
    handle.remove()
    method = Nuwa(budget=64)
    with method(model) as trace:
        seen0, h0 = capture(model, 0, "position_ids")
        cos0, hc = capture(model, 0, "position_embeddings")
        seen4, h4 = capture(model, 4, "position_ids")
        out = model(**inputs)
        h0.remove(), h4.remove(), hc.remove()
    record = trace.stage1[0][0]
    assert record.k1 == 112 and record.n_per_cell == 1 and len(record.anchors) == 112
    cells = (record.anchors // 24 // 2) * 12 + (record.anchors % 24) // 2
    assert int(torch.bincount(cells).max()) == 1
    assert int((~record.aggregated).sum()) == 50  # nuwa.md §1.4: 50 high of 112 at quantile 0.55
    positions = seen0[0][0]
    vis = positions[5 : 5 + 112]
    assert torch.equal(positions[:5], torch.arange(5))
    assert torch.equal(vis, 5 + record.anchors) and bool((vis.diff() > 0).all())
    assert torch.equal(positions[5 + 112 :], torch.arange(5 + 576, n))  # text after the image
    kept = trace.decisions[1].selected[0]
    assert trace.decisions[1].layer == 4 and kept.numel() == 16
    assert torch.equal(seen4[0][0], torch.cat([torch.arange(5), 5 + kept, torch.arange(5 + 576, n)]))
    torch.testing.assert_close(cos0[0][0], full_cos[0][0, positions])
    assert kv_lengths(out.past_key_values) == [text + 112] * 4 + [text + 16] * 4
    assert trace.tokens_per_layer(8) == [112] * 4 + [16] * 4


def odd_qwen():
    return small_model_for("qwen2_5_vl")


def test_qwen_ratio_half_on_a_23_by_17_grid():
    """nuwa.md §9: ratio 0.5 on a 23×17 merged grid (391 tokens, padded to 24×18) gives
    K₁ = ⌈0.6·391⌉ = 235 anchors on the real grid; stage 2 keeps int(0.66·235) = 155 from layer
    15·8/28 → 4; MRoPE cos/sin of every token are the untouched model's."""
    model = odd_qwen()
    inputs = qwen_inputs(model, [([(46, 34)], 12)], seed=4)
    full_cos, handle = capture(model, 0, "position_embeddings")
    model(**inputs)
    handle.remove()
    with Nuwa(ratio=0.5)(model) as trace:
        cos0, hc = capture(model, 0, "position_embeddings")
        out = model(**inputs)
        hc.remove()
    record = trace.stage1[0][0]
    assert record.grid == (23, 17) and record.k1 == 235 and record.n_per_cell == 3
    assert len(record.anchors) == 235 and int(record.anchors.max()) < 391
    assert [(d.layer, d.kept[0]) for d in trace.decisions] == [(0, 235), (4, 155)]
    visual = inputs["input_ids"][0] == IMAGE_TOKEN
    entered = ~visual
    entered[visual.nonzero().flatten()[record.anchors]] = True
    torch.testing.assert_close(cos0[0][0], full_cos[0][0, entered])
    text = int((~visual).sum())
    assert kv_lengths(out.past_key_values) == [text + 235] * 4 + [text + 155] * 4


# ---- batches, images, attention implementations, generate ---------------------------------------


def batch_inputs(model, family: str) -> tuple[dict, list[dict]]:
    """A left-padded batch and its samples alone. Sample 0: two images (Qwen: 8×8 and 5×7 merged);
    sample 1: one image (Qwen: 6×6), a longer question."""
    if family == "llava":
        two = small_inputs(model, (8,), images_per_prompt=2, seed=13)
        one = small_inputs(model, (30,), seed=14)
        return merge_samples(model, two, one), [two, one]
    batch = qwen_inputs(model, [([(16, 16), (10, 14)], 8), ([(12, 12)], 30)], seed=5)
    return batch, [split_sample(batch, 0), split_sample(batch, 1)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one(family, attn):
    model = small_model_for(family) if attn == "sdpa" else eager_model(family)
    inputs, singles = batch_inputs(model, family)
    method = Nuwa(k1=0.4, k2=0.5)
    with method(model) as trace:
        logits = model(**inputs).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    batch_decisions, batch_stage1 = trace.decisions, trace.stage1
    assert [len(s) for s in batch_stage1] == [2, 1]
    for b, single in enumerate(singles):
        with method(model) as trace:
            alone = model(**single).logits[0, -1]
            alone_gen = model.generate(**single, max_new_tokens=3, do_sample=False)
        torch.testing.assert_close(logits[b], alone, rtol=1e-4, atol=1e-4)
        assert torch.equal(generated[b, -3:], alone_gen[0, -3:])
        for d_batch, d_alone in zip(batch_decisions, trace.decisions, strict=True):
            assert torch.equal(d_batch.selected[b], d_alone.selected[0])
        for r_batch, r_alone in zip(batch_stage1[b], trace.stage1[0], strict=True):
            assert torch.equal(r_batch.anchors, r_alone.anchors) and r_batch.threshold == r_alone.threshold
    if family == "qwen2_5_vl":  # images of different sizes: each keeps its own counts
        assert [r.grid for r in batch_stage1[0]] == [(8, 8), (5, 7)]
        assert [r.k1 for r in batch_stage1[0]] == [26, 14]  # ⌈0.4·64⌉, ⌈0.4·35⌉
        kept = [len(r.anchors) for r in batch_stage1[0] + batch_stage1[1]]
        assert kept[0] == 26 and kept[1] <= 14 and kept[2] == 15  # the 5×7 grid may lose padded anchors
        assert batch_decisions[1].kept == [13 + kept[1] // 2, 7]  # int(0.5·anchors) per image


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_top_k_1_is_greedy_and_text_prompts_run_untouched(family):
    model = small_model_for(family)
    inputs = small_inputs(model, (20, 9), seed=7)
    text = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5]}
    vanilla_text = model.generate(**text, max_new_tokens=2, do_sample=False)
    with Nuwa(k1=16, k2=4)(model):
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=1)
        routed_text = model.generate(**text, max_new_tokens=2, do_sample=False)
    assert torch.equal(greedy, sampled)
    assert torch.equal(vanilla_text, routed_text)


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decode_without_positions_continues_the_full_numbering(family):
    """A decode loop that passes neither position ids nor a mask: the model places each new token
    from ``cache.get_seq_length()``, which reports prompt + generated tokens while every layer holds
    fewer; the tokens equal ``generate()``'s."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=9)
    n = inputs["input_ids"].shape[1]
    with Nuwa(k1=16, k2=4)(model):
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, n:]
        out = model(**inputs)
        cache_ = out.past_key_values
        tokens = [out.logits[0, -1].argmax()]
        for step in range(2):
            assert cache_.get_seq_length() == n + step
            out = model(input_ids=tokens[-1].view(1, 1), past_key_values=cache_)
            tokens.append(out.logits[0, -1].argmax())
    text = n - 64
    assert kv_lengths(cache_) == [text + 16 + 2] * 4 + [text + 4 + 2] * 4
    assert torch.equal(torch.stack(tokens), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_modes_and_threads_give_greedys_tokens(family):
    """use_cache=False re-runs the prompt with its images every step, prompt lookup sends drafts in the
    first forward, and two threads encode and decode at once: stage 1's reports are matched to each
    call's own images, so every mode gives the plain greedy tokens."""
    model = small_model_for(family)
    inputs = {i: small_inputs(model, (20,), seed=30 + i) for i in range(2)}
    method = Nuwa(k1=16, k2=4, reroute=True)
    with method(model):
        greedy = {i: model.generate(**inputs[i], max_new_tokens=3, do_sample=False) for i in range(2)}
        no_cache = model.generate(**inputs[0], max_new_tokens=3, do_sample=False, use_cache=False)
        lookup = model.generate(**inputs[0], max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=2)
        threaded = {}

        def run(i):
            with torch.no_grad():
                threaded[i] = model.generate(**inputs[i], max_new_tokens=3, do_sample=False)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert torch.equal(no_cache, greedy[0]) and torch.equal(lookup, greedy[0])
    assert all(torch.equal(threaded[i], greedy[i]) for i in range(2))


# ---- Nüwa + Reroute ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reroute_readmits_anchors_with_prune_counts_and_kv_bytes(family):
    model = small_model_for(family)
    inputs = small_inputs(model, (20, 11), seed=21)
    caches, traces = {}, {}
    for reroute in (False, True):
        with Nuwa(k1=32, k2=6, reroute=reroute)(model) as trace:
            caches[reroute] = model(**inputs).past_key_values
        traces[reroute] = trace
    rr = traces[True].decisions
    assert [d.layer for d in rr] == [0, 4, 5, 6, 7]
    assert kv_lengths(caches[True]) == kv_lengths(caches[False])
    assert kv_bytes(caches[True]) == kv_bytes(caches[False])
    assert traces[True].tokens_per_layer(8) == traces[False].tokens_per_layer(8) == [32] * 4 + [6] * 4
    readmitted = 0
    for b in range(2):
        anchors = set(rr[0].selected[b].tolist())
        for before, after in zip(rr[1:], rr[2:], strict=False):
            back = set(after.selected[b].tolist()) - set(before.selected[b].tolist())
            assert back <= anchors and after.reentered[b] == len(back)
            readmitted += len(back)
    assert readmitted > 0
