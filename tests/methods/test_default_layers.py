"""Default decision layers on a hybrid decoder (Qwen3.5: decisions scored at full-attention layers only).

The published layers scaled to the depth mostly miss the layers a hybrid decoder can score at; every
in-decoder method's default layers move, by one rule (``methods.base.fit_layers``, applied in
``TokenReduction.bind``), to the next allowed layer after the previous decision. Layers the caller
gives are taken at their word and refused (``docs/hybrid.md``).
"""

from __future__ import annotations

import pytest
import torch
from hybrid_support import QWEN3_5_9B, released_layout
from hybrid_support import tiny_qwen3_5 as _qwen3_5

from vlm_reroute import PDrop
from vlm_reroute.adapters import adapter_for
from vlm_reroute.budget.schedule import Schedule
from vlm_reroute.budget.shapes import ModelShape
from vlm_reroute.budget.target import BudgetTarget
from vlm_reroute.kinds import ScoreFrom
from vlm_reroute.methods import DART, SparseVLM, method_from_spec
from vlm_reroute.methods.base import fit_layers
from vlm_reroute.testing.models import tiny_model

METHODS = ["fastv", "pdrop", "random", "sparsevlm", "dart"]


def test_fit_layers_moves_each_default_to_the_next_allowed_layer():
    assert fit_layers("M", (1, 2, 4, 6), (1, 3, 5, 7)) == (1, 3, 5, 7)
    assert fit_layers("M", (2, 7, 15, 23), QWEN3_5_9B) == (3, 7, 15, 23)
    assert fit_layers("M", (1, 2, 4), (2, 4, 6)) == (2, 4, 6)  # 1 and 2 both need 2: the second moves on
    assert fit_layers("M", (3, 6, 13, 20), tuple(range(1, 28))) == (3, 6, 13, 20)  # all allowed: unchanged
    with pytest.raises(
        ValueError, match=r"M: the default decision layers \[1, 2, 4, 6\].*allowed: \[2, 4, 6\]"
    ):
        fit_layers("M", (1, 2, 4, 6), (2, 4, 6))


@pytest.mark.parametrize(
    ("name", "reroute", "expected"),
    [
        ("fastv", True, (3, 7, 15, 23)),
        ("pdrop", False, (3, 7, 15, 23)),  # published [2, 7, 15, 23]: layer 2 is linear attention
        ("pdrop", True, (3, 7, 15, 23)),
        ("random", True, (3, 7, 15, 23)),
        ("sparsevlm", False, (4, 8, 16)),  # scored by the layer before: [3, 7, 16] -> after 3, 7, 15
        ("sparsevlm", True, (4, 8, 16)),
        ("dart", False, (3,)),
        ("dart", True, (3, 7, 15, 23)),
    ],
)
def test_defaults_on_the_released_qwen3_5_layout(name, reroute, expected):
    method = method_from_spec(name, reroute=reroute, ratio=0.111)
    adapter = released_layout()
    bound = method.bind(adapter)  # type: ignore[arg-type]  # what bind reads of an adapter
    assert bound.layers_for(32) == expected
    assert bound.reroute == reroute and type(bound) is type(method)


def test_fixed_defaults_without_a_budget_move_too():
    adapter = released_layout()
    assert SparseVLM().bind(adapter).layers_for(32) == (4, 8, 16)  # type: ignore[arg-type]
    assert DART(reroute=True).bind(adapter).layers_for(32) == (3, 7, 15, 23)  # type: ignore[arg-type]
    # a schedule the caller gave is taken at its word (and refused by the adapter when run)
    given = PDrop(layers=[2, 7], target=BudgetTarget(ratio=0.2))
    assert given.bind(adapter) is given  # type: ignore[arg-type]


@pytest.mark.parametrize("reroute", [False, True])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_its_defaults_on_a_tiny_qwen3_5(name, reroute):
    """Each method's defaults with a budget ran into the adapter's refusal for PDrop, Random, SparseVLM
    and DART + Reroute before the rule; now the decisions sit at allowed layers and keep the counts
    the solver gives for those layers."""
    model, inputs = _qwen3_5()
    adapter = adapter_for(model)
    method = method_from_spec(name, reroute=reroute, ratio=0.111)
    score_from = ScoreFrom.of(getattr(method, "score_from", "current")) or ScoreFrom.CURRENT
    default = method.layers_for(8)
    expected = fit_layers(type(method).__name__, default, adapter.allowed_decision_layers(score_from))
    with method(model) as trace, torch.no_grad():
        model(**inputs)
    layers = tuple(d.layer for d in trace.decisions)
    assert layers == expected
    assert set(layers) <= set(adapter.allowed_decision_layers(score_from))
    sizes = [layout.length for layout in trace.layouts[0]]  # the images' visual tokens
    shape = ModelShape.from_config(model.config)
    solved = [method.bind(adapter).resolve(shape, n) for n in sizes]  # solved on the moved layers
    assert {s.layers for s in solved} == {layers}
    kept = [sum(per_image) for per_image in zip(*(s.keep for s in solved), strict=True)]
    assert [int(d.selected[0].numel()) for d in trace.decisions] == kept


def test_sparsevlm_defaults_without_a_budget_run_on_a_tiny_qwen3_5():
    model, inputs = _qwen3_5()
    with SparseVLM(reroute=True)(model) as trace, torch.no_grad():
        model(**inputs)
    assert [d.layer for d in trace.decisions] == [2, 4, 6]
    release = Schedule.of([2, 4, 6], (300 / 576, 200 / 576, 110 / 576), True)  # the default tier
    per_image = [release.counts(layout.length) for layout in trace.layouts[0]]
    kept = [sum(counts) for counts in zip(*per_image, strict=True)]
    assert [int(d.selected[0].numel()) for d in trace.decisions] == kept


def test_sparsevlm_default_layers_scale_with_the_depth():
    """The release's [3, 7, 16] of 32 scale like every method's (docs/methods.md: 8 layers -> [1, 2, 4]);
    before, ``SparseVLM()`` kept layer 16 and was refused on any shallower decoder."""
    assert SparseVLM().layers_for(32) == (3, 7, 16)
    assert SparseVLM().check_depth(28) == (3, 6, 14)
    assert SparseVLM().check_depth(8) == (1, 2, 4)
    assert SparseVLM().keep_counts(8, None)(576) == (300, 200, 110)
    assert SparseVLM(layers=[2, 5], keep=[0.5, 0.25]).layers_for(8) == (2, 5)


def test_all_attention_families_keep_the_scaled_defaults():
    model = tiny_model("llava")
    adapter = adapter_for(model)
    for name in METHODS:
        for reroute in (False, True):
            method = method_from_spec(name, reroute=reroute, ratio=0.111)
            assert method.bind(adapter) is method, (name, reroute)
