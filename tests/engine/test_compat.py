"""The transformers guard: an untested release or a renamed internal is refused at the ``with`` line
with one line; the engine reads the cache where the installed release puts it and triggers none of
its deprecation warnings."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from conftest import model_for
from packaging.version import Version
from transformers.cache_utils import DynamicCache

from vlm_reroute import PDrop, versions
from vlm_reroute.engine import compat
from vlm_reroute.testing import tiny_inputs

METHOD = PDrop(layers=[2, 4], keep=[64, 32], reroute=True)


def test_installed_release_is_inside_the_tested_range():
    assert versions.in_range(transformers.__version__, versions.TRANSFORMERS_RANGE)


# the first untested release is read from the range, so raising the range does not leave this stale
@pytest.mark.parametrize("version", ["5.22.3", versions.TRANSFORMERS_RANGE[1], "6.0.0"])
def test_untested_release_is_refused_with_one_line(monkeypatch, version):
    monkeypatch.delenv(versions.OPT_IN, raising=False)
    monkeypatch.setattr(transformers, "__version__", version)
    model = model_for("llava")
    with pytest.raises(RuntimeError) as error, METHOD(model):
        pass
    message = str(error.value)
    assert "\n" not in message
    assert f"transformers {version} is outside" in message
    assert versions.range_text(versions.TRANSFORMERS_RANGE) in message and versions.OPT_IN in message


def test_opt_in_downgrades_the_refusal_to_one_warning(monkeypatch):
    monkeypatch.setenv(versions.OPT_IN, "1")
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    model, inputs = model_for("llava"), tiny_inputs(model_for("llava"))
    with pytest.warns(compat.UntestedTransformersWarning) as record, METHOD(model) as trace:
        model(**inputs)
    assert len(record) == 1 and "5.99.0" in str(record[0].message)
    assert [d.layer for d in trace.decisions] == [2, 4]


def test_opt_in_needs_exactly_1(monkeypatch):
    monkeypatch.setenv(versions.OPT_IN, "yes")
    with pytest.raises(RuntimeError, match="outside the range"):
        compat.check_version("5.99.0")


def test_renamed_cache_keyword_is_refused_at_the_with_line():
    """A release that passes the cache under a name the engine does not know fails before routing."""
    model = model_for("llava")
    layer = model.model.language_model.layers[0]
    original = type(layer)

    class RenamedLayer(original):
        def forward(self, hidden_states, attention_mask=None, kv_store=None, **kwargs):  # noqa: D401
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)

    layer.__class__ = RenamedLayer
    try:
        with pytest.raises(RuntimeError) as error, METHOD(model):
            pass
    finally:
        layer.__class__ = original
    message = str(error.value)
    assert "\n" not in message
    assert "RenamedLayer.forward takes none of ['cache', 'past_key_values']" in message
    assert versions.range_text(versions.TRANSFORMERS_RANGE) in message


def test_mask_function_without_the_cache_parameter_is_refused(monkeypatch):
    import transformers.masking_utils as masking

    def create_causal_mask(config, inputs_embeds, attention_mask, kv=None, layer_idx=None):
        raise AssertionError("never called")

    monkeypatch.setattr(masking, "create_causal_mask", create_causal_mask)
    compat.mask_cache_keyword.cache_clear()
    try:
        with pytest.raises(
            RuntimeError, match=r"create_causal_mask takes none of \['cache', 'past_key_values'\]"
        ):
            compat.mask_cache_keyword()
    finally:
        compat.mask_cache_keyword.cache_clear()


def test_cache_keyword_matches_the_installed_release():
    model = model_for("qwen2_vl")
    layers = list(model.model.language_model.layers)
    keyword = compat.cache_keyword(model, layers)
    assert keyword in inspect.signature(type(layers[0]).forward).parameters
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    assert keyword == expected


def test_cache_argument_reads_the_deprecated_alias_only_where_the_model_does():
    cache = DynamicCache()
    assert compat.cache_argument({"cache": cache}, "cache") is cache
    assert compat.cache_argument({"past_key_values": cache}, "cache") is cache  # renamed by the model
    assert compat.cache_argument({"past_key_values": cache}, "past_key_values") is cache
    assert compat.cache_argument({"cache": cache}, "past_key_values") is None  # 5.23 ignores cache=


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_routed_generate_triggers_no_transformers_deprecation(family):
    """The engine passes the cache under the current keyword: no FutureWarning reaches the user."""
    model = model_for(family)
    inputs = tiny_inputs(model, text_lengths=(5, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with METHOD(model):
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_output_cache_reads_either_field():
    model = model_for("llava")
    with torch.no_grad():
        out = model(**tiny_inputs(model), use_cache=True)
    assert isinstance(compat.output_cache(out), DynamicCache)


def test_version_command_prints_each_library_and_whether_it_was_tested(monkeypatch):
    from typer.testing import CliRunner

    from vlm_reroute.cli import app

    monkeypatch.setattr(
        versions,
        "installed_versions",
        lambda: {"transformers": "5.30.1", "torch": "2.13.0+cpu", "lmms-eval": None},
    )
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("vlm-reroute ")
    assert (
        lines[1]
        == f"transformers 5.30.1 (tested {versions.range_text(versions.TRANSFORMERS_RANGE)}): UNTESTED"
    )
    assert lines[2] == "torch 2.13.0+cpu (tested >=2.13.0,<2.14.0): tested"
    assert lines[3] == "lmms-eval - (tested >=0.7.3,<0.8.0): not installed"


@pytest.mark.parametrize(
    ("installed", "inside"),
    [("5.23.0", True), ("5.24.9", True), ("5.25.0", False), ("5.22.99", False), ("5.24.0.dev0", True)],
)
def test_in_range(installed, inside):
    assert versions.in_range(installed, ("5.23.0", "5.25.0")) is inside


def test_a_hub_kernel_not_checked_under_routing_is_refused(monkeypatch):
    """From transformers 5.25 ``from_pretrained`` kernelizes (hub kernels replace some modules'
    forwards on GPUs): row-wise and elementwise kernels route, any other one is refused in one line."""
    model = model_for("llava")
    act = model.model.language_model.layers[3].mlp.act_fn
    monkeypatch.setattr(type(act), "kernel_layer_name", "SiLU", raising=False)
    monkeypatch.setitem(act.__dict__, "_kernel_repo", "kernels-community/activation")  # as kernelize marks it
    with METHOD(model):
        pass
    monkeypatch.setattr(compat, "ROUTABLE_KERNELS", compat.ROUTABLE_KERNELS - {"SiLU"})
    with pytest.raises(RuntimeError) as error, METHOD(model):
        pass
    message = str(error.value)
    assert "\n" not in message
    assert "layers[3].mlp.act_fn runs the hub kernel 'SiLU'" in message and "use_kernels=False" in message
