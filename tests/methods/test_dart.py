"""DART (arXiv 2502.11494) and the set-selector seam.

The kept sets are checked against ``dart_reference.dart_choice``, a token-by-token float64 transcription
of the selection loop of methods.md §3.2 (image pivots and text pivots by key L1 norm, processed in
descending norm, exact quotas, lowest cosine of the final-normed states first), fed with the hidden
states the untouched model carries into the decision layer (a prune's first decision sees exactly those).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import small_inputs, small_model_for, split_sample
from dart_reference import dart_choice, layer_keys
from reference import embeddings_and_positions

from vlm_reroute import method_from_spec
from vlm_reroute.adapters import adapter_for
from vlm_reroute.budget.solver import solve_schedule
from vlm_reroute.methods import DART, PDrop
from vlm_reroute.testing.models import tiny_inputs


def entering(model, inputs: dict, layer: int) -> torch.Tensor:
    """Hidden states ``(1, N, D)`` entering ``layer`` in the untouched model."""
    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = adapter_for(model).layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return grabbed["h"]


def image_runs(visual: torch.Tensor) -> list[list[int]]:
    """Positions of each image: runs of consecutive visual tokens."""
    runs: list[list[int]] = []
    for t in visual.nonzero().flatten().tolist():
        if runs and runs[-1][-1] == t - 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def direct(model, inputs, layer, count, image_pivots=4, text_pivots=4, features="final_norm") -> list[int]:
    """Indices (into the visual tokens) DART keeps at its first decision, image by image."""
    hidden = entering(model, inputs, layer)
    _, pos = embeddings_and_positions(model, inputs)
    norms = layer_keys(model, layer, hidden, pos).double().abs().sum(dim=1).tolist()
    decoder = adapter_for(model).decoder
    states = {"final_norm": decoder.norm(hidden), "hidden": hidden}[features][0]
    feats = torch.nn.functional.normalize(states.double(), dim=-1)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    kept = []
    for run in image_runs(visual):
        after = [t for t in range(run[-1] + 1, visual.numel()) if not visual[t]]
        kept += dart_choice(norms, feats, run, after, count, image_pivots, text_pivots)
    rank = (visual.cumsum(0) - 1).tolist()
    return sorted(rank[t] for t in kept)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_kept_set_is_the_published_loop(family):
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=4)
    with DART(layers=[2], keep=12)(model) as trace:
        model(**inputs)
    assert trace.decisions[0].selected[0].tolist() == direct(model, inputs, 2, 12)


@pytest.mark.parametrize(
    ("settings", "count"),
    [({"image_pivots": 2, "text_pivots": 0}, 9), ({"image_pivots": 1, "text_pivots": 6}, 20), ({}, 4)],
)
def test_pivot_settings_follow_the_loop(settings, count):
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=7)
    with DART(layers=[3], keep=count, **settings)(model) as trace:
        model(**inputs)
    assert trace.decisions[0].selected[0].tolist() == direct(model, inputs, 3, count, **settings)


def test_raw_states_option_follows_the_loop():
    model = small_model_for("qwen2_vl")
    inputs = small_inputs(model, (20,), seed=2)
    with DART(layers=[2], keep=10, features="hidden")(model) as trace:
        model(**inputs)
    assert trace.decisions[0].selected[0].tolist() == direct(model, inputs, 2, 10, features="hidden")


def test_two_images_each_keep_their_count_and_their_own_pivots():
    model = small_model_for("qwen2_vl")
    inputs = tiny_inputs(model, (20,), images_per_prompt=2, grid=16, seed=1)
    with DART(layers=[2], keep=10)(model) as trace:
        model(**inputs)
    selected = trace.decisions[0].selected[0]
    assert torch.bincount(selected // 64).tolist() == [10, 10]
    assert selected.tolist() == direct(model, inputs, 2, 10)


@pytest.mark.parametrize("keep", [0.02, 0.05, 0.07, 0.3, 1.0])
def test_exactly_k_per_image_at_every_decision(keep):
    """Small counts (below the 4 image pivots, solved at run time) keep their top pivots only."""
    model = small_model_for("llava")
    inputs = small_inputs(model, (20, 9), seed=3)
    k = max(1, int(64 * keep))
    with DART(layers=[1, 2, 4, 6], keep=keep, reroute=True)(model) as trace:
        model(**inputs)
    assert [d.kept for d in trace.decisions] == [[k, k]] * 4


def test_deterministic_and_batch_invariant():
    model = small_model_for("qwen2_5_vl")
    inputs = small_inputs(model, (20, 6), seed=11)
    method = DART(layers=[1, 2, 4, 6], keep=9, reroute=True)
    runs = []
    for _ in range(2):
        with method(model) as trace:
            model(**inputs)
        runs.append([[s.tolist() for s in d.selected] for d in trace.decisions])
    assert runs[0] == runs[1]
    assert any(sum(d.reentered) for d in trace.decisions), "reroute re-admits deferred tokens"
    for b in range(2):
        with method(model) as alone:
            model(**split_sample(inputs, b))
        assert [d.selected[0].tolist() for d in alone.decisions] == [r[b] for r in runs[0]]


def test_a_visual_scoring_query_keeps_its_slot():
    """A prompt ending on an image token: that token is kept and the image still keeps exactly k."""
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=5)
    end = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero().max()) + 1
    cut = {
        **inputs,
        "input_ids": inputs["input_ids"][:, :end],
        "attention_mask": inputs["attention_mask"][:, :end],
    }
    with DART(layers=[2], keep=8, text_pivots=0)(model) as trace:
        model(**cut)
    assert trace.decisions[0].selected[0].tolist()[-1] == 63
    assert trace.decisions[0].kept == [8]


@dataclass(frozen=True)
class FirstK:
    """A toy selector: the first ``counts[g]`` candidates of every image (``extra`` more when broken)."""

    extra: int = 0
    score_from: str = "current"

    def select(self, ctx, counts):
        rank = ctx.candidates.long().cumsum(dim=1) - 1  # one image per sample in these tests
        limit = counts[ctx.image_ids.clamp(min=0)] + self.extra
        return ctx.candidates & (rank < limit)


def test_any_method_may_take_a_selector():
    model = small_model_for("llava")
    inputs = small_inputs(model, (20,), seed=1)
    with PDrop(layers=[2, 4], keep=[10, 5], scorer=FirstK())(model) as trace:
        model(**inputs)
    assert [d.selected[0].tolist() for d in trace.decisions] == [list(range(10)), list(range(5))]
    assert trace.decisions[0].scores[0][:10].tolist() == [1.0] * 10  # a set's trace scores: 1 / 0
    broken = PDrop(layers=[2], keep=[10], scorer=FirstK(extra=1))
    with pytest.raises(RuntimeError, match=r"the selector chose \[11\] tokens per image"), broken(model):
        model(**inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_pivots": 0}, r"DART\(image_pivots=0\): allowed is an int ≥ 1"),
        ({"text_pivots": -1}, r"DART\(text_pivots=-1\): allowed is an int ≥ 0"),
        ({"image_pivots": 2.0}, r"DART\(image_pivots=2.0\): allowed is an int ≥ 1"),
        ({"features": "cls"}, r"DART\(features='cls'\): allowed are final_norm, layer_norm, hidden"),
        ({"keep": 3}, r"DART\(image_pivots=4, keep=\[3\]\): every stage keeps its image pivots"),
        ({"layers": [2, 5], "keep": [8, 16]}, r"keep counts must not increase"),
        ({"keep": [8, 4]}, r"DART\(keep=\[8, 4\]\) without layers"),
        ({"score_from": "next"}, r"score_from='next'"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        DART(**kwargs)
    assert "\n" not in str(error.value)


def test_registered_solved_and_spelled_like_the_others():
    method = method_from_spec("dart", reroute=True, ratio=0.111)
    assert isinstance(method, DART) and method.reroute and method.target.ratio == 0.111
    prune = solve_schedule(32, 576, "dart", False, avg_t=64)
    reroute = solve_schedule(32, 576, "dart", True, avg_t=64)
    assert prune.layers == (2,) and reroute.layers == (2, 7, 15, 23)
    assert len(set(reroute.keep)) == 1 and abs(prune.avg_t - 64) <= 0.5 and abs(reroute.avg_t - 64) <= 0.5
    assert DART(reroute=True, keep=16).resolve(_shape(), 64).tokens_per_layer(8, 64) == [64] + [16] * 7


def _shape():
    from vlm_reroute.budget import ModelShape

    return ModelShape.from_config(small_model_for("llava").config)
