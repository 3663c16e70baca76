"""Stage-1 methods (DivPrune, VisionZip) on a hybrid decoder (Qwen3.5): binding fits their default
pass-through decisions to layers the family can score at, and binds a composed in-decoder method.

Before, ``Stage1Method.bind`` bound ``then`` only: ``DivPrune()`` kept its pass-through decision at the
middle layer (4 of 8, 16 of 32), a linear-attention layer, and the adapter refused it.
"""

from __future__ import annotations

import pytest
import torch
from hybrid_support import QWEN3_5_9B, released_layout
from hybrid_support import tiny_qwen3_5 as _qwen3_5

from vlm_reroute.adapters import adapter_for
from vlm_reroute.budget.shapes import ModelShape
from vlm_reroute.kinds import ScoreFrom
from vlm_reroute.methods import DivPrune, PDrop, SparseVLM, VisionZip, method_from_spec
from vlm_reroute.methods.stage1 import fit_pass_through, pass_through_layers
from vlm_reroute.testing.models import tiny_model


def test_pass_through_decisions_move_on_and_drop_when_no_layer_is_left():
    assert fit_pass_through("M", (16,), QWEN3_5_9B) == (19,)
    assert fit_pass_through("M", (16, 20, 24, 28), QWEN3_5_9B) == (19, 23, 27, 31)
    # 24 layers, full attention every 4th: the fourth reroute decision finds no layer after 23
    assert pass_through_layers(24, True) == (12, 15, 18, 21)
    assert fit_pass_through("M", (12, 15, 18, 21), (3, 7, 11, 15, 19, 23)) == (15, 19, 23)
    assert fit_pass_through("M", (4, 5, 6, 7), tuple(range(1, 8))) == (4, 5, 6, 7)  # all allowed
    with pytest.raises(ValueError, match=r"M: no allowed decision layer .* layer 6 \(allowed: \[1, 3\]\)"):
        fit_pass_through("M", (6,), (1, 3))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (DivPrune(), (19,)),
        (DivPrune(reroute=True), (19, 23, 27, 31)),
        (DivPrune(k=64), (19,)),  # an int entry: a fixed schedule, whose default layers still move
        (method_from_spec("divprune", reroute=True, ratio=0.1), (19, 23, 27, 31)),
    ],
)
def test_defaults_on_the_released_qwen3_5_layout(method, expected):
    bound = method.bind(released_layout())  # type: ignore[arg-type]  # what bind reads of an adapter
    assert bound.layers_for(32) == expected and bound.reroute == method.reroute
    assert bound.check_depth(32) == expected
    assert method.layers_for(32) != expected  # the method itself is unchanged (frozen)


def test_visionzip_with_a_fixed_entry_is_fitted_though_its_schedule_is_fixed():
    """``VisionZip()`` (64 tokens enter) has a fixed schedule, which the base rule leaves alone."""
    assert VisionZip().schedule() is not None
    assert VisionZip().fit_default_layers(32, QWEN3_5_9B).layers_for(32) == (19,)
    assert VisionZip(reroute=True).fit_default_layers(32, QWEN3_5_9B).layers_for(32) == (19, 23, 27, 31)


def test_layers_given_and_composed_methods_are_taken_at_their_word():
    layout = released_layout()
    assert DivPrune(layers=[4], keep=[0.5]).bind(layout).layers_for(32) == (4,)  # type: ignore[arg-type]
    composed = DivPrune() + PDrop(layers=[2, 7], keep=[0.5, 0.25])
    assert composed.bind(layout).layers_for(32) == (2, 7)  # type: ignore[arg-type]
    fitted = (DivPrune() + SparseVLM()).bind(layout)  # type: ignore[arg-type]
    assert fitted.layers is None and fitted.then is not None
    assert fitted.then.layers_for(32) == (4, 8, 16)  # SparseVLM's own rule (scored by the layer before)


@pytest.mark.parametrize(
    "method",
    [
        DivPrune(),
        DivPrune(reroute=True),
        VisionZip(k=0.5),
        VisionZip(k=4, reroute=True),
        method_from_spec("divprune", reroute=True, ratio=0.2),
        method_from_spec("visionzip", ratio=0.2),
        DivPrune() + SparseVLM(reroute=True),
        VisionZip(k=0.5) + method_from_spec("pdrop", ratio=0.3),
        DivPrune(k=0.5) + method_from_spec("fastv", reroute=True, ratio=0.5),
    ],
    ids=repr,
)
def test_stage1_methods_run_their_defaults_on_a_tiny_qwen3_5(method):
    model, inputs = _qwen3_5()
    adapter = adapter_for(model)
    with method(model) as trace, torch.no_grad():
        model(**inputs)
    decided = [d.layer for d in trace.decisions]
    bound = method.bind(adapter)
    shape = ModelShape.from_config(model.config)
    assert decided == [0, *bound.check_depth(shape.num_layers)]  # stage 1 at 0, then the fitted layers
    score_from = ScoreFrom.of(getattr(bound.then, "score_from", "current")) or ScoreFrom.CURRENT
    assert set(decided[1:]) <= set(adapter.allowed_decision_layers(score_from))
    sizes = [layout.length for layout in trace.layouts[0]]
    plans = [bound.resolve(shape, n) for n in sizes]
    entered = sum(int(s.entry) for s in plans)
    assert trace.tokens_per_layer(8)[0] == entered < sum(sizes)
    kept = [sum(per_image) for per_image in zip(*(s.keep for s in plans), strict=True)]
    assert [int(d.selected[0].numel()) for d in trace.decisions[1:]] == kept


def test_all_attention_families_keep_the_default_pass_through_layers():
    adapter = adapter_for(tiny_model("llava"))
    for method in (DivPrune(), DivPrune(reroute=True), VisionZip(), VisionZip(reroute=True)):
        bound = method.bind(adapter)
        assert bound.layers is None and bound.layers_for(8) == pass_through_layers(8, method.reroute)
