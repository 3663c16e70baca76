"""The method × family × mode matrix: every registered method on every supported family, prune and
reroute, through the engine's four promises.

Adding a method or a family is one line below (``METHODS`` / ``FAMILIES``); a guard test fails when
a registered method or an adapter's model class is missing from the matrix.

1. keep-all is bit-identical to the untouched model (prefill logits and generated tokens);
2. a batch (left padding) equals its prompts run one by one (logits and decisions);
3. each layer's KV cache holds exactly text + the visual tokens of its stage;
4. routed logits (and attention scores) equal the independent full-matrix reference.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from conftest import MATRIX_TOKENS, small_inputs, small_model_for, split_sample
from dart_reference import dart_select_of
from reference import routed_reference
from sparsevlm_reference import sparsevlm_scores_of

from vlm_reroute import kv_lengths
from vlm_reroute.adapters import ADAPTERS, adapter_for
from vlm_reroute.budget.schedule import Schedule
from vlm_reroute.budget.solver import solve_schedule
from vlm_reroute.methods import method_class, method_names
from vlm_reroute.scoring.attention import LastTokenAttention
from vlm_reroute.scoring.dart import DartSelector
from vlm_reroute.scoring.query_rows import QueryRowAttention
from vlm_reroute.testing.models import IMAGE_TOKEN

# one line per family: name for vlm_reroute.testing's tiny builders -> model class it builds
FAMILIES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}
# one line per method (registry key)
METHODS = ["fastv", "pdrop", "random", "nuwa", "sparsevlm"]
METHODS.append("dart")  # DART, arXiv 2502.11494 (a set selector)
METHODS += ["divprune", "visionzip"]  # stage-1 methods (arXiv 2503.02175, 2412.04467)
# methods defined for some families only (the other cases are skipped with this reason)
SUPPORTED = {"nuwa": ("llava", "qwen2_5_vl")}
SUPPORTED["nuwa"] += ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe")  # merger ViTs (Qwen3.5: test_nuwa_engine.py)
SUPPORTED["nuwa"] += ("llava_next", "llava_onevision")  # anyres views (methods/nuwa/views.py)
SUPPORTED["nuwa"] += ("idefics3", "smolvlm", "internvl")  # tiles + a whole-image view, each on its grid
# visionzip: every family has a vision tap (adapters/vision.py, vision_views.py, vision_prompt.py)
# methods whose exactness the generic full-matrix reference cannot express (checked elsewhere)
OWN_REFERENCE = {"nuwa": "stage 1 rewrites features; tests/methods/test_nuwa_engine.py, test_nuwa_views.py"}
OWN_REFERENCE["divprune"] = "a decision at layer 0; tests/methods/test_divprune.py has its reference"
OWN_REFERENCE["visionzip"] = "stage 1 rewrites features; tests/methods/test_visionzip*.py have its reference"
MODES = {"prune": False, "reroute": True}
DEPTH, TOKENS = 8, MATRIX_TOKENS  # 8 decoder layers, 64 visual tokens per image (about 64: conftest)
# the decision layers each case must run at DEPTH 8 (written out, not asked of the method): the
# published 32-layer layers scaled by 8/32 and rounded half up — FastV [3] -> [1], PDrop and the
# reroute variants [2|3, 7, 15, 23] -> [1, 2, 4, 6]; Nüwa: its stage 1 enters at 0, then its
# text-guided stage at 4 (prune) or at 4..7 (reroute). One line per method.
DECISION_LAYERS = {
    "fastv": {"prune": (1,), "reroute": (1, 2, 4, 6)},
    "pdrop": {"prune": (1, 2, 4, 6), "reroute": (1, 2, 4, 6)},
    "random": {"prune": (1, 2, 4, 6), "reroute": (1, 2, 4, 6)},
    "nuwa": {"prune": (0, 4), "reroute": (0, 4, 5, 6, 7)},
    "sparsevlm": {"prune": (1, 2, 4), "reroute": (1, 2, 4)},  # [3, 7, 16] at 32 layers
    "dart": {"prune": (1,), "reroute": (1, 2, 4, 6)},  # [2] and [2, 7, 15, 23] at 32 layers
    "divprune": {"prune": (0, 4), "reroute": (0, 4, 5, 6, 7)},  # stage 1 at 0, then as Nüwa's stage 2
    "visionzip": {"prune": (0, 4), "reroute": (0, 4, 5, 6, 7)},
}
# methods scored by the layer before each decision (score_from="previous": SparseVLM's mapping)
SCORED_BEFORE = {"sparsevlm"}


def expected_layers(model, method: str, mode: str) -> list[int]:
    """``DECISION_LAYERS``; on a hybrid model (linear-attention layers, from its config's
    ``layer_types``) a decision moves to the next full-attention layer (layer 0, an entry, stays),
    or for a method of ``SCORED_BEFORE`` to the next layer after a full-attention one."""
    layers = DECISION_LAYERS[method][mode]
    types = getattr(model.config.get_text_config(), "layer_types", None)
    if not types or "linear_attention" not in types:
        return list(layers)
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if method in SCORED_BEFORE:
        full = [i + 1 for i in full if i + 1 < len(types)]
    return sorted({layer if layer == 0 else min(i for i in full if i >= layer) for layer in layers})


def _case(family: str, method: str, mode: str, skip: dict[str, str] | None = None):
    reason = None
    if method in SUPPORTED and family not in SUPPORTED[method]:
        reason = f"{method} is defined for {', '.join(SUPPORTED[method])} only"
    elif skip and method in skip:
        reason = skip[method]
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(family, method, mode, id=f"{family}-{method}-{mode}", marks=marks)


CASES = [_case(f, m, r) for f in FAMILIES for m in METHODS for r in MODES]
REFERENCE_CASES = [_case(f, m, r, OWN_REFERENCE) for f in FAMILIES for m in METHODS for r in MODES]


def build(method: str, mode: str, keep_all: bool = False, tokens: int = TOKENS, model=None):
    """The method's default layers and rule, solved for avg_T = a quarter of the tokens (or keep all).

    On a family that scores at some layers only (Qwen3.5: full-attention layers), each default
    layer moves to the next allowed one."""
    cls, reroute = method_class(method, MODES[mode])
    layers = default = cls.default_layers(DEPTH, reroute)
    if model is not None:
        allowed = adapter_for(model).allowed_decision_layers(getattr(cls, "score_from", "current"))
        layers = tuple(sorted({min(a for a in allowed if a >= layer) for layer in layers}))
    if keep_all:
        return cls.from_schedule(Schedule(layers, (1.0,) * len(layers), reroute))
    explicit = layers if layers != default else None
    # a first decision the family moved later (SparseVLM, scored before layer 2 on Qwen3.5) carries
    # every token through more layers: a quarter is below its floor, so aim at a count it reaches
    avg_t = tokens / 4 if layers[0] <= default[0] or cls.stage_zero else tokens * (layers[0] + 1) / DEPTH
    return solve_schedule(DEPTH, tokens, method, reroute, avg_t=avg_t, layers=explicit).to_method()


def tokens_per_image(inputs: dict) -> int:
    """Visual tokens of each (equal) image of the matrix inputs."""
    counts = (inputs["input_ids"] == IMAGE_TOKEN).sum(dim=1).unique()
    assert counts.numel() == 1
    return int(counts)


def test_the_matrix_covers_every_method_and_family():
    assert sorted(METHODS) == sorted(method_names()) == sorted(DECISION_LAYERS)
    classes = {name for adapter in ADAPTERS for name in adapter.model_classes}
    assert classes <= set(FAMILIES.values()), (
        f"families missing from the matrix: {classes - set(FAMILIES.values())}"
    )


@cache
def _untouched(family: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The keep-all inputs and the untouched model's logits and greedy tokens (once per family)."""
    model = small_model_for(family)
    inputs = small_inputs(model, (20, 13))
    with torch.no_grad():
        return inputs, model(**inputs).logits, model.generate(**inputs, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize(("family", "method", "mode"), CASES)
def test_keep_all_is_bit_identical(family, method, mode):
    model = small_model_for(family)
    inputs, vanilla, vanilla_gen = _untouched(family)
    tokens = tokens_per_image(inputs)
    chosen = build(method, mode, keep_all=True, model=model)
    with chosen(model) as trace:
        routed = model(**inputs).logits
        routed_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert [d.layer for d in trace.decisions] == expected_layers(model, method, mode)
    assert all(d.kept == [tokens, tokens] for d in trace.decisions)
    assert torch.equal(vanilla, routed)
    assert torch.equal(vanilla_gen, routed_gen)


@pytest.mark.parametrize(("family", "method", "mode"), CASES)
def test_batch_equals_one_by_one(family, method, mode):
    model = small_model_for(family)
    inputs = small_inputs(model, (20, 6), seed=11)
    chosen = build(method, mode, tokens=tokens_per_image(inputs), model=model)
    with chosen(model) as trace:
        batch_logits = model(**inputs).logits[:, -1]
    batch_decisions = trace.decisions
    assert [d.layer for d in batch_decisions] == expected_layers(model, method, mode)
    for b in range(2):
        with chosen(model) as trace:
            alone = model(**split_sample(inputs, b)).logits[0, -1]
        torch.testing.assert_close(batch_logits[b], alone, rtol=1e-4, atol=1e-4)
        for d_batch, d_alone in zip(batch_decisions, trace.decisions, strict=True):
            assert torch.equal(d_batch.selected[b], d_alone.selected[0])


@pytest.mark.parametrize(("family", "method", "mode"), CASES)
def test_kv_cache_holds_each_stage(family, method, mode):
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=5)
    tokens = tokens_per_image(inputs)
    chosen = build(method, mode, tokens=tokens, model=model)
    with chosen(model) as trace:
        cache = model(**inputs, use_cache=True).past_key_values
    n_text = inputs["input_ids"].shape[1] - tokens
    recurrent = adapter_for(model).recurrent_layers  # linear attention: a fixed-size state, no length
    expected = [None if i in recurrent else n_text + v for i, v in enumerate(trace.tokens_per_layer(DEPTH))]
    assert kv_lengths(cache) == expected
    schedule = chosen.resolve(_shape(model), tokens)
    assert trace.tokens_per_layer(DEPTH) == schedule.tokens_per_layer(DEPTH, tokens)


@pytest.mark.parametrize(("family", "method", "mode"), REFERENCE_CASES)
def test_matches_the_full_matrix_reference(family, method, mode):
    model = small_model_for(family)
    inputs = small_inputs(model, (20,), seed=3)
    chosen = build(method, mode, tokens=tokens_per_image(inputs), model=model)
    with chosen(model) as trace:
        logits = model(**inputs).logits[0, -1]
    selected = [d.selected[0] for d in trace.decisions]
    layers = [d.layer for d in trace.decisions]
    assert layers == expected_layers(model, method, mode)
    scorer = chosen.make_scorer()
    scores_of = None
    if isinstance(scorer, QueryRowAttention):  # SparseVLM: rater rows written from methods.md
        scores_of, _ = sparsevlm_scores_of(model, inputs, scorer.gravity, scorer.priority_heads)
    select_of = (
        dart_select_of(inputs, scorer.image_pivots, scorer.text_pivots)
        if isinstance(scorer, DartSelector)
        else None
    )
    ref_logits, ref_scores = routed_reference(
        model,
        inputs,
        layers,
        selected,
        MODES[mode],
        score_from=scorer.score_from,
        scores_of=scores_of,
        select_of=select_of,
    )
    torch.testing.assert_close(logits, ref_logits[-1], rtol=1e-5, atol=1e-5)
    if select_of is not None:  # a set rule: the reference chose its own sets (dart_reference.py)
        assert [d.selected[0].tolist() for d in trace.decisions] == [r.tolist() for r in ref_scores]
    if isinstance(scorer, LastTokenAttention | QueryRowAttention):
        for decision, scores in zip(trace.decisions, ref_scores, strict=True):
            torch.testing.assert_close(decision.scores[0], scores, rtol=1e-4, atol=1e-7)


def _shape(model):
    from vlm_reroute.budget import ModelShape

    return ModelShape.from_config(model.config)
