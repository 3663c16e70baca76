"""SparseVLM (arXiv 2410.04417) and SparseVLM+ (v2.0): raters, kept tokens, settings, memory, budget.

References are written from ``methods.md`` §3.1 in ``tests/sparsevlm_reference.py`` (float64
raters, the layer's own eager attention matrix), independently of ``src/``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import small_inputs, small_model_for, split_sample
from reference import embeddings_and_positions, full_matrix_scores, routed_reference
from sparsevlm_reference import reference_raters, sparsevlm_scores_of
from torch.utils._python_dispatch import TorchDispatchMode

from vlm_reroute.adapters import adapter_for
from vlm_reroute.budget.published import code_level_tiers, sparsevlm_recycled
from vlm_reroute.budget.solver import solve_schedule
from vlm_reroute.methods import MethodSpec, SparseVLM, method_from_spec
from vlm_reroute.scoring.query_rows import GRAVITY_FLOOR, QueryRowAttention, gravity_bias
from vlm_reroute.scoring.raters import Raters
from vlm_reroute.testing.models import IMAGE_TOKEN

VARIANTS = {"v1.5": (False, None), "v2.0": (True, 14 / 32)}


class RaterSpy:
    """Records what ``QueryRowAttention.prepare`` returns (the raters of each prefill)."""

    def __init__(self, monkeypatch):
        self.seen: list[Raters] = []
        original = QueryRowAttention.prepare

        def prepare(scorer, ctx):
            raters = original(scorer, ctx)
            self.seen.append(raters)
            return raters

        monkeypatch.setattr(QueryRowAttention, "prepare", prepare)


def method(variant: str, reroute: bool, layers=(1, 2, 4), keep=(24, 12, 6)) -> SparseVLM:
    return SparseVLM(layers=layers, keep=keep, reroute=reroute, variant=variant)


# ---- raters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_raters_are_the_published_formula(family, monkeypatch):
    model = small_model_for(family)
    inputs = small_inputs(model, (30,), seed=4)
    spy = RaterSpy(monkeypatch)
    with method("v1.5", False)(model):
        model(**inputs)
    embeds, _ = embeddings_and_positions(model, inputs)
    visual = inputs["input_ids"][0] == IMAGE_TOKEN
    expected = reference_raters(embeds, visual)
    (raters,) = spy.seen
    assert raters.mask.shape == (1, visual.numel())
    assert torch.equal(raters.mask[0], expected)
    after = int(visual.nonzero().max()) + 1
    assert 0 < int(expected.sum()) < visual.numel() - after  # a proper subset of the text after the image
    assert not expected[:after].any()  # nothing before or inside the image rates it


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_each_image_has_its_own_raters_and_a_batch_equals_its_samples(family, monkeypatch):
    model = small_model_for(family)
    inputs = small_inputs(model, (25, 9), seed=2, images_per_prompt=2)
    spy = RaterSpy(monkeypatch)
    with method("v1.5", True)(model) as trace:
        model(**inputs)
    batch_decisions = trace.decisions
    (raters,) = spy.seen
    assert raters.mask.shape[0] == 4 and raters.sample.tolist() == [0, 0, 1, 1]
    embeds, _ = embeddings_and_positions(model, inputs)
    for b in range(2):
        keep = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][keep]
        visual = ids == IMAGE_TOKEN
        rank = visual.cumsum(0) - 1
        for image in range(2):  # image i's rows, the text after it (the question)
            own = visual & (rank // int(visual.sum() // 2) == image)
            expected = reference_raters(embeds[b : b + 1, keep], own, text=~visual)  # text after it only
            assert torch.equal(raters.mask[2 * b + image, keep], expected)
        with method("v1.5", True)(model) as alone:
            model(**split_sample(inputs, b))
        assert torch.equal(spy.seen[-1].mask[:, :], raters.mask[2 * b : 2 * b + 2, keep])
        for d_batch, d_alone in zip(batch_decisions, alone.decisions, strict=True):
            assert torch.equal(d_batch.selected[b], d_alone.selected[0])


def test_text_between_images_rates_the_first_image_only(monkeypatch):
    model = small_model_for("llava")
    two = small_inputs(model, (12,), seed=5, images_per_prompt=2)
    ids = two["input_ids"][0]
    visual = ids == IMAGE_TOKEN
    n = int(visual.sum()) // 2
    start = int(visual.nonzero()[0])
    middle = ids[-8:]  # question tokens, between the two images
    ids = torch.cat([ids[: start + n], middle, ids[start + n :]])[None]
    inputs = {**two, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    spy = RaterSpy(monkeypatch)
    with method("v1.5", False)(model):
        model(**inputs)
    (raters,) = spy.seen
    embeds, _ = embeddings_and_positions(model, inputs)
    visual = ids[0] == IMAGE_TOKEN
    rank = visual.cumsum(0) - 1
    between = torch.zeros_like(visual)
    between[start + n : start + n + 8] = True
    for image in range(2):
        own = visual & (rank // n == image)
        assert torch.equal(raters.mask[image], reference_raters(embeds, own, text=~visual))
    assert raters.mask[0, between].any() and not raters.mask[1, between].any()


def test_an_image_closing_the_prompt_is_rated_by_the_last_token(monkeypatch):
    model = small_model_for("llava")
    inputs = small_inputs(model, (0,), seed=1)
    spy = RaterSpy(monkeypatch)
    with method("v1.5", False)(model) as trace:
        logits = model(**inputs).logits
    (raters,) = spy.seen
    assert raters.mask[0].nonzero().flatten().tolist() == [inputs["input_ids"].shape[1] - 1]
    assert logits.isfinite().all() and [d.kept for d in trace.decisions] == [[24], [12], [6]]


# ---- kept tokens against the published formulas ------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reroute", [False, True], ids=["prune", "reroute"])
def test_kept_tokens_are_the_published_rule(family, variant, reroute):
    model = small_model_for(family)
    inputs = small_inputs(model, (30,), seed=7)
    chosen = method(variant, reroute)
    with chosen(model) as trace:
        logits = model(**inputs).logits[0, -1]
    gravity, priority = VARIANTS[variant]
    scores_of, _ = sparsevlm_scores_of(model, inputs, gravity, priority)
    layers = [d.layer for d in trace.decisions]
    selected = [d.selected[0] for d in trace.decisions]
    ref_logits, ref_scores = routed_reference(
        model, inputs, layers, selected, reroute, score_from="previous", scores_of=scores_of
    )
    torch.testing.assert_close(logits, ref_logits[-1], rtol=1e-5, atol=1e-5)
    candidates = torch.ones(ref_scores[0].numel(), dtype=torch.bool)
    for decision, scores in zip(trace.decisions, ref_scores, strict=True):
        torch.testing.assert_close(decision.scores[0], scores, rtol=1e-4, atol=1e-6)
        top = scores.masked_fill(~candidates, -math.inf).topk(decision.kept[0]).indices.sort().values
        assert torch.equal(decision.selected[0], top)
        if not reroute:
            candidates = torch.zeros_like(candidates)
            candidates[top] = True
    if reroute:
        assert sum(d.reentered[0] for d in trace.decisions) > 0  # deferred tokens came back


def test_v2_differs_from_v1_5_and_keeps_a_fraction_of_the_heads():
    model = small_model_for("llava")
    inputs = small_inputs(model, (30,), seed=7)
    scores = {}
    for variant in VARIANTS:
        with method(variant, False)(model) as trace:
            model(**inputs)
        scores[variant] = trace.decisions[0].scores[0]
    assert not torch.allclose(scores["v1.5"], scores["v2.0"])
    heads = model.config.text_config.num_attention_heads
    assert max(1, math.floor(14 / 32 * heads + 0.5)) < heads  # the tiny model keeps a proper subset


def test_gravity_guard_keeps_the_sign_and_never_divides_by_zero():
    head_dim, positions = 8, torch.arange(4096, dtype=torch.float32)
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.cat([positions[:, None] * inv] * 2, dim=-1)[None]
    cos, sin = angles.cos(), angles.sin()
    ctx = SimpleNamespace(
        layer=SimpleNamespace(self_attn=SimpleNamespace(head_dim=head_dim)),
        adapter=adapter_for(small_model_for("llava")),
    )
    bias = gravity_bias(ctx, (cos[:, :1], sin[:, :1]), (cos, sin))[0, 0]  # row at position 0
    raw = 2 * torch.cos(positions[:, None] * inv).sum(dim=1) / math.sqrt(head_dim)  # Σ 2cos(Δθ)/√h
    floor = GRAVITY_FLOOR * math.sqrt(head_dim)
    assert (raw < 0).any() and (raw.abs() < 5 * floor).any()  # B crosses zero: the guard matters
    assert bias.isfinite().all() and (bias.abs() >= floor).all()
    big = raw.abs() >= floor
    torch.testing.assert_close(bias[big], raw[big], rtol=1e-4, atol=1e-5)
    assert torch.equal(bias.sign()[big], raw.sign()[big])


# ---- memory: rater rows only, never sequence × sequence ------------------------------------------


class Shapes(TorchDispatchMode):
    """The shape of every tensor an operation returns inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def quadratic(shapes, length: int) -> list[tuple[int, ...]]:
    """Shapes with two dimensions of at least ``length``."""
    return [s for s in shapes if sum(d >= length for d in s) >= 2]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_scorer_never_builds_a_sequence_by_sequence_tensor(variant, monkeypatch):
    model = small_model_for("llava")
    inputs = small_inputs(model, (400,), seed=3)
    n_text = int((inputs["input_ids"][0] != IMAGE_TOKEN).sum())  # every key set holds all of it
    spy = Shapes()
    for name in ("score", "prepare"):
        original = getattr(QueryRowAttention, name)

        def watched(scorer, ctx, _original=original):
            with spy:
                return _original(scorer, ctx)

        monkeypatch.setattr(QueryRowAttention, name, watched)
    with method(variant, True)(model) as trace:
        model(**inputs)
    assert len(trace.decisions) == 3 and len(spy.shapes) > 50
    assert quadratic(spy.shapes, n_text) == []
    # the check can fail: the full-matrix reference builds (…, S, S) tensors
    embeds, pos = embeddings_and_positions(model, inputs)
    present = torch.ones(embeds.shape[1], dtype=torch.bool)
    with Shapes() as reference:
        full_matrix_scores(model, 1, embeds, pos, present)
    assert quadratic(reference.shapes, n_text)


# ---- settings, registry, budget ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"variant": "v1"}, ["variant='v1'", "'v1.5'", "'v2.0'"]),
        ({"variant": "2.0"}, ["variant='2.0'", "allowed"]),
        ({"recycling": "transient"}, ["recycling='transient'", "only 'off'"]),
        ({"layers": [3, 7]}, ["layers=[3, 7]", "keep"]),
        ({"score_from": "next"}, ["score_from='next'", "'current'", "'previous'"]),
        ({"layers": [3, 7], "keep": [10, 20]}, ["keep"]),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, fragments):
    with pytest.raises(ValueError) as error:
        SparseVLM(**kwargs)
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"heads": "min"}, "heads='min'"),
        ({"priority_heads": 0}, "priority_heads=0"),
        ({"priority_heads": 1.5}, "priority_heads=1.5"),
        ({"gravity": "yes"}, "gravity='yes'"),
    ],
)
def test_bad_scorer_settings_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        QueryRowAttention(**kwargs)


def test_scoring_without_prepared_raters_is_refused():
    with pytest.raises(RuntimeError, match=r"needs the raters its prepare\(\) chose \(ctx.state=None\)"):
        QueryRowAttention().score(SimpleNamespace(state=None))


def test_registry_spec_and_defaults():
    built = method_from_spec("sparsevlm", reroute=True, ratio=0.111)
    assert isinstance(built, SparseVLM) and built.reroute and built.variant == "v1.5"
    assert built.score_from == "previous" and built.layers_for(32) == (3, 7, 16)
    plus = method_from_spec("sparsevlm", tier=64, variant="v2.0")
    assert plus.make_scorer().gravity and plus.make_scorer().priority_heads == 14 / 32
    assert MethodSpec.from_options("sparsevlm", True, ratio=0.111).build() == built
    assert SparseVLM().keep == (300 / 576, 200 / 576, 110 / 576)  # the release's default tier, 192
    assert SparseVLM(variant="v2.0").keep == (300 / 576, 200 / 576, 118 / 576)
    with pytest.raises(ValueError, match="variant='v3'"):
        method_from_spec("sparsevlm", ratio=0.111, variant="v3")


def test_the_rule_reproduces_the_published_64_tier_and_solves_the_label():
    nominal = (3 * 576 + 4 * 66 + 9 * 30 + 16 * 17) / 32  # the published "64" without recycling: 79.2
    assert solve_schedule(32, 576, "sparsevlm", avg_t=nominal).keep == (66, 30, 17)
    for reroute in (False, True):
        solved = solve_schedule(32, 576, "sparsevlm", reroute, avg_t=64)
        assert solved.layers == (3, 7, 16) and abs(solved.avg_t - 64) <= 0.5
        assert solved.keep[0] > solved.keep[1] > solved.keep[2]
    assert SparseVLM.keep_rule(66, 576, 4, False)[3] == pytest.approx(17 * 17 / 30)


def test_published_tiers_at_code_level():
    assert sparsevlm_recycled(576, (66, 30, 17)) == (16, 2, 1)  # methods.md §3.1 c: +16, +2, +1
    by_tier = {(t.variant, t.tier): t.avg_t for t in code_level_tiers("sparsevlm")}
    for key, value in {
        ("v1.5", 64): 82.3,
        ("v1.5", 128): 145.4,
        ("v1.5", 192): 206.5,
        ("v2.0", 64): 81.8,
        ("v2.0", 128): 144.1,
        ("v2.0", 192): 206.8,
    }.items():
        assert abs(by_tier[key] - value) <= 0.051, key  # methods.md rounds to one decimal
    assert code_level_tiers("fastv") == ()


def test_budget_command_lists_sparsevlm_beside_its_published_tiers():
    from cli_support import invoke

    result = invoke("budget", "--model", "llava-1.5-7b", "--ratio", "0.111")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.startswith("SparseVLM + Reroute"))
    assert "3,7,16" in row
    assert any('"64" 82.3' in line for line in lines)


def test_the_command_line_runs_sparsevlm_on_two_images_of_different_sizes(tmp_path_factory):
    import json

    from cli_support import invoke, saved_checkpoints, saved_images

    checkpoints, images = saved_checkpoints(tmp_path_factory), saved_images(tmp_path_factory)
    args = ["--model", checkpoints["qwen2_vl"], "--image", images["big"], "--image", images["small"]]
    args += ["--prompt", "Which is larger?", "--method", "sparsevlm", "--reroute", "--ratio", "0.3"]
    result = invoke("run", *args, "--json", "--threads", "1", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    big, small = report["visual_tokens"]
    assert big > small > 0 and report["method"] == "SparseVLM + Reroute"
    assert report["schedule"]["layers"] == [1, 2, 4]
    for n, keep in zip((big, small), report["schedule"]["keep_per_image"], strict=True):
        assert keep[0] > keep[1] > keep[2] and keep[0] < n  # the rule's shape, per image
    assert [d["kept"] for d in report["decisions"]] == [
        a + b for a, b in zip(*report["schedule"]["keep_per_image"], strict=True)
    ]
