"""Differential fuzz: the engine against an independent float64 reference (tests/fuzz_reference.py).

``test_fuzz_quick`` runs a fixed slice in the normal suite; ``test_fuzz_long`` (marker ``fuzz``,
deselected by default) runs hundreds of cases: ``pytest -m fuzz``, sized by the environment
variables ``VLM_REROUTE_FUZZ_CASES`` (default 300) and ``VLM_REROUTE_FUZZ_SEED`` (default 1).
The fault tests break the engine on purpose and check that the quick slice notices.
"""

from __future__ import annotations

import os

import pytest
import torch
from fuzz_cases import TIE_MARGIN, Outcome, check_decision, run_case
from fuzz_draw import FAMILIES, make_case
from fuzz_reference import DecisionRecord

from vlm_reroute.adapters import ADAPTERS
from vlm_reroute.testing.families import FAMILY_CLASSES

QUICK_CASES, QUICK_SEED = 44, 0  # 4 cases per family
LONG_CASES = int(os.environ.get("VLM_REROUTE_FUZZ_CASES", "300"))
LONG_SEED = int(os.environ.get("VLM_REROUTE_FUZZ_SEED", "1"))
CHUNK = 25


def _report(outcomes: list[Outcome]) -> str:
    bad = [o for o in outcomes if o.failures]
    lines = [f"{len(bad)} of {len(outcomes)} cases disagree with the float64 reference:"]
    for o in bad[:5]:
        lines += [str(o), "  reproduce: " + o.case.repro()]
    return "\n".join(lines)


def _first_mismatch(count: int, seed: int) -> Outcome | None:
    for index in range(count):
        outcome = run_case(make_case(index, seed))
        if outcome.failures:
            return outcome
    return None


def test_the_fuzz_covers_every_family_an_adapter_serves():
    original = {
        "llava": "LlavaForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    fuzzed = {{**original, **FAMILY_CLASSES}[f] for f in FAMILIES}
    served = {name for adapter in ADAPTERS for name in adapter.model_classes}
    assert served <= fuzzed, f"families the fuzz does not draw: {sorted(served - fuzzed)}"


def _checked_families(outcomes: list[Outcome]) -> set[str]:
    return {o.case.family for o in outcomes if not o.unchecked}


def test_fuzz_quick():
    outcomes = [run_case(make_case(i, QUICK_SEED)) for i in range(QUICK_CASES)]
    assert not any(o.failures for o in outcomes), _report(outcomes)
    # the slice covers what it claims to cover, and the reference decided (almost) every case
    cases = [o.case for o in outcomes]
    assert _checked_families(outcomes) == set(FAMILIES)
    assert sum(bool(o.unchecked) for o in outcomes) <= 2, [str(o) for o in outcomes if o.unchecked]
    assert {c.mode for c in cases} >= {"forward", "greedy"}
    assert {c.schedule.reroute for c in cases} == {False, True}
    assert {c.schedule.score_from for c in cases} == {"current", "previous"}
    assert any(len(c.prompts) > 1 and len({sum(p.texts) for p in c.prompts}) > 1 for c in cases)


def test_reference_is_the_unrouted_model():
    """The reference itself, with a schedule that keeps every token, reproduces the plain model
    (forward logits, generate logits and greedy tokens): it reads the model right, on its own."""
    outcomes = [run_case(make_case(i, QUICK_SEED), routed=False) for i in range(2 * len(FAMILIES))]
    assert not any(o.failures for o in outcomes), _report(outcomes)
    assert _checked_families(outcomes) == set(FAMILIES)


@pytest.mark.fuzz
@pytest.mark.parametrize("chunk", range(0, LONG_CASES, CHUNK))
def test_fuzz_long(chunk):
    indices = range(chunk, min(chunk + CHUNK, LONG_CASES))
    outcomes = [run_case(make_case(i, LONG_SEED)) for i in indices]
    assert not any(o.failures for o in outcomes), _report(outcomes)
    assert sum(bool(o.unchecked) for o in outcomes) <= 3, [str(o) for o in outcomes if o.unchecked]


# ---- faults the fuzz must catch ------------------------------------------------------------------
# Each injection is one small function so it can follow the engine's internals when they move.


def inject_reroute_as_prune(monkeypatch) -> None:
    """Reroute run as prune: the candidate pool is only the last decision's survivors, so a
    deferred token can never come back."""
    from vlm_reroute.engine.prefill import Prefill

    def candidates(self, reroute):
        return self.visual if self.present is None else self.present

    monkeypatch.setattr(Prefill, "candidates", candidates)


def inject_repacked_positions(monkeypatch) -> None:
    """Re-packed positions: every stage's layers get the rotary embedding of contiguous positions
    (those of the first L tokens) instead of the kept tokens' original positions."""
    from vlm_reroute.engine.decide import Decider

    decide = Decider.decide

    def repacked(self, st, i, layer, hidden):
        out = decide(self, st, i, layer, hidden)
        cos, sin = st.rope
        length = out.shape[1]
        st.stage_kwargs["position_embeddings"] = (cos[:, :length], sin[:, :length])
        return out

    monkeypatch.setattr(Decider, "decide", repacked)


def inject_padding_blind_scorer(monkeypatch) -> None:
    """A scorer that ignores the attention mask: left padding tokens count as keys."""
    from dataclasses import replace

    from vlm_reroute.scoring.attention import LastTokenAttention

    score = LastTokenAttention.score

    def blind(self, ctx):
        return score(self, replace(ctx, keys=~ctx.visual | ctx.candidates))

    monkeypatch.setattr(LastTokenAttention, "score", blind)


def inject_ties_to_the_later_token(monkeypatch) -> None:
    """Top-k that breaks exact ties towards the later token (a 1e-6 ramp over the positions:
    below every real score gap the fuzz allows, above float32 rounding of equal scores)."""
    from vlm_reroute.engine import prefill

    top_k = prefill.top_k_per_image

    def later_first(scores, *args, **kwargs):
        n = scores.shape[1]
        ramp = torch.arange(n, device=scores.device, dtype=torch.float32) / n * 1e-6
        return top_k(scores.float() + ramp, *args, **kwargs)

    monkeypatch.setattr(prefill, "top_k_per_image", later_first)


@pytest.mark.parametrize(
    "inject",
    [
        inject_reroute_as_prune,
        inject_repacked_positions,
        inject_padding_blind_scorer,
        inject_ties_to_the_later_token,
    ],
)
def test_fuzz_detects_a_broken_engine(inject, monkeypatch):
    inject(monkeypatch)
    caught = _first_mismatch(QUICK_CASES, QUICK_SEED)
    assert caught is not None, f"{inject.__name__}: the quick fuzz slice did not notice the fault"
    # a comparison caught it, not a crash of the injected code
    assert not any(f.startswith("engine raised") for f in caught.failures), str(caught)


def test_decisions_differ_only_within_the_tie_margin():
    """The comparison itself: a swap of two tokens whose reference scores are closer than
    TIE_MARGIN is float rounding; a wider swap is a mismatch."""
    scores = torch.tensor([0.5, 0.3, 0.3 - TIE_MARGIN / 2, 0.1], dtype=torch.float64)
    rec = DecisionRecord(1, scores, torch.ones(4, dtype=torch.bool), torch.tensor([0, 1]), [2])
    image = torch.zeros(4, dtype=torch.long)
    near, far, same = Outcome(make_case(0)), Outcome(make_case(0)), Outcome(make_case(0))
    check_decision(near, 0, 0, rec, torch.tensor([0, 2]), image)
    check_decision(far, 0, 0, rec, torch.tensor([0, 3]), image)
    check_decision(same, 0, 0, rec, torch.tensor([0, 1]), image)
    assert (near.failures, near.near_ties) == ([], 1)
    assert len(far.failures) == 1 and far.near_ties == 0
    assert (same.failures, same.near_ties) == ([], 0)


def test_a_last_stage_of_linear_attention_layers_only():
    """Regression (found by the long fuzz, seed 1 case 227): on a 5-layer Qwen3.5 a decision at the
    last layer, a linear-attention one, opens a stage with no attention layer; it needs no attention
    mask (its layers take the 2-D padding mask) and must route and decode like the reference."""
    case = make_case(227, 1)
    assert case.family == "qwen3_5" and case.schedule.layers[-1] == case.shape[0] - 1
    outcome = run_case(case)
    assert not outcome.failures and not outcome.unchecked, str(outcome)
