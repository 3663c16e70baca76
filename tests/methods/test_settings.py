"""Settings are immutable and always valid: no invalid setting reaches the executor.

Methods are frozen dataclasses checked in ``__post_init__``; ``method.replace(...)`` (or
``dataclasses.replace``) derives a variant through the same checks, and applying a method checks
its settings again, so even a setting forced past the freeze is refused with the constructor's
message before any hook is installed.
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import model_for

from vlm_reroute import FastV, PDrop, Random

CASES = [
    (PDrop(layers=[1, 3], keep=[8, 4]), "keep", [0, 0]),
    (PDrop(layers=[1, 3], keep=[8, 4]), "keep", [1.5, 0.5]),
    (PDrop(layers=[1, 3], keep=[8, 4]), "layers", [3, 1]),
    (PDrop(layers=[1, 3], keep=[8, 4]), "score_from", "next"),
    (PDrop(layers=[1, 3], keep=[8, 4]), "reroute", "yes"),
    (FastV(layer=2, keep=8), "keep", -1),
    (FastV(layer=2, keep=8), "score_from", "next"),
    (Random(layers=[1, 3], keep=[8, 4], seed=1), "seed", -1),
    (Random(layers=[1, 3], keep=[8, 4], seed=1), "seed", True),
]


def _constructor_error(method, name: str, value) -> tuple[type, str]:
    fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    with pytest.raises((ValueError, TypeError)) as info:
        type(method)(**{**fields, name: value})
    return type(info.value), str(info.value)


@pytest.mark.parametrize(("method", "name", "value"), CASES)
def test_settings_are_frozen(method, name, value):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(method, name, value)


@pytest.mark.parametrize(("method", "name", "value"), CASES)
def test_replace_checks_like_the_constructor(method, name, value):
    kind, message = _constructor_error(method, name, value)
    with pytest.raises(kind) as info:
        method.replace(**{name: value})
    assert str(info.value) == message
    with pytest.raises(kind) as info:
        dataclasses.replace(method, **{name: value})
    assert str(info.value) == message


@pytest.mark.parametrize(("method", "name", "value"), CASES)
def test_forced_setting_never_reaches_the_executor(method, name, value):
    """A setting forced past the freeze (``object.__setattr__``) is refused when the method is
    applied, with the constructor's message, and the model is left without hooks."""
    kind, message = _constructor_error(method, name, value)
    model = model_for("llava")
    forced = dataclasses.replace(method)
    object.__setattr__(forced, name, value)
    with pytest.raises(kind) as info, forced(model):
        pass
    assert str(info.value) == message
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_replace_derives_a_valid_variant():
    base = PDrop(layers=[1, 3], keep=[8, 4])
    variant = base.replace(keep=[16, 8], reroute=True)
    assert variant.keep == (16, 8) and variant.reroute and base.keep == (8, 4) and not base.reroute
