"""``torch.compile`` never makes a method silently not apply.

Code compiled before the block ignores hooks added later: such a call is refused at its first
routed call (the layer hooks that ran are counted), and a model compiled in place is refused when
the method is applied. Compiling inside the block routes exactly, and after the block the compiled
model is vanilla again. A tiny model keeps compilation to a few seconds (backend ``eager``; one
check with ``aot_eager``).
"""

from __future__ import annotations

import pytest
import torch

from vlm_reroute import PDrop, kv_lengths
from vlm_reroute.testing.models import TextShape, tiny_inputs, tiny_model

METHOD = PDrop(layers=[1, 2], keep=[8, 4], reroute=True)


@pytest.fixture
def small():
    """A fresh 3-layer LLaVA (16 visual tokens) and no compiled code left by other tests."""
    torch._dynamo.reset()
    model = tiny_model("llava", shape=TextShape(layers=3, hidden=32, heads=2, ffn=64), image_size=56)
    yield model, tiny_inputs(model, (4,))
    torch._dynamo.reset()


@pytest.mark.parametrize("part", ["model", "decoder"])
def test_model_compiled_before_the_block_is_refused_at_its_first_call(small, part):
    """``torch.compile(model)``, or a model whose decoder is an ``OptimizedModule``, compiled and run
    before the block: its compiled code would skip the layer hooks, so the first routed call raises."""
    model, inputs = small
    vanilla = model(**inputs).logits
    if part == "model":
        compiled = torch.compile(model, backend="eager")
    else:
        model.model.language_model = torch.compile(model.model.language_model, backend="eager")
        compiled = model
    torch.testing.assert_close(compiled(**inputs).logits, vanilla)
    with METHOD(model) as trace:
        with pytest.raises(RuntimeError, match=r"without vlm-reroute's layer hooks.*compiled.*before"):
            compiled(**inputs)
        assert trace.prefills == 0
        if part == "model":
            routed = model(**inputs)  # the uncompiled model still routes in the same block
            assert trace.prefills == 1
            assert kv_lengths(routed.past_key_values) == [25, 17, 13]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiling_inside_the_block_routes(small, backend):
    """Also: the method applied to the ``OptimizedModule`` itself routes the model it wraps."""
    model, inputs = small
    vanilla = model(**inputs).logits
    compiled = torch.compile(model, backend=backend)
    with METHOD(compiled) as trace:
        routed = model(**inputs)
        decided = [d.selected[0] for d in trace.decisions]
        out = compiled(**inputs)
        assert trace.prefills == 2
        assert all(torch.equal(a, d.selected[0]) for a, d in zip(decided, trace.decisions, strict=True))
    assert kv_lengths(out.past_key_values) == kv_lengths(routed.past_key_values) == [25, 17, 13]
    torch.testing.assert_close(out.logits, routed.logits, rtol=1e-5, atol=1e-5)
    if backend != "eager":
        return  # the compiler backend does not matter after the block: one check is enough
    after = compiled(**inputs)  # the block is over: vanilla again
    assert kv_lengths(after.past_key_values) == [25, 25, 25]
    torch.testing.assert_close(after.logits, vanilla, rtol=1e-5, atol=1e-5)


def test_model_compiled_in_place_is_refused_when_applied(small):
    model, _ = small
    model.compile(backend="eager")  # nothing is compiled until the first call: the check is free
    with (
        pytest.raises(RuntimeError, match=r"compiled in place.*before the method was applied"),
        METHOD(model),
    ):
        pass
    assert not model._forward_pre_hooks
