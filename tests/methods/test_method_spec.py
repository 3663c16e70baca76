"""One method request, whichever edge it comes from: ``MethodSpec`` from keywords, command-line option values
and lmms-eval's ``--model_args``, checked in one place with one-line errors, built by one function; the
enums that replaced the strings inside, accepted as strings at the edges; the loaders' shared rule."""

from __future__ import annotations

import dataclasses

import pytest

from vlm_reroute import FastV, LastTokenAttention, PDrop, Random, ScoreFrom, method_from_spec
from vlm_reroute.budget.target import BudgetTarget
from vlm_reroute.methods.spec import DEFAULT_RATIO, VANILLA, MethodSpec, describe_budget
from vlm_reroute.methods.spec_parsing import option_budget, option_keep, option_layers
from vlm_reroute.scoring.attention import HeadReduction

# ---- three edges, one value ---------------------------------------------------------------------


def test_the_three_spellings_give_the_same_spec():
    expected = MethodSpec("pdrop", True, avg_t=64.0)
    assert MethodSpec.parse("pdrop+reroute", tier=64.0) == expected
    assert MethodSpec.parse("PDrop + Reroute", tier=64.0) == expected
    assert MethodSpec.parse("pdrop", reroute=True, tier=64.0) == expected
    assert MethodSpec.from_options("pdrop", True, tier=64.0) == expected
    assert MethodSpec.from_args("pdrop", "true", "64") == expected
    assert hash(expected) == hash(MethodSpec.from_args("PDrop", True, 64))


def test_options_default_to_the_ratio_and_parse_schedules():
    assert MethodSpec.from_options("fastv") == MethodSpec("fastv", ratio=DEFAULT_RATIO)
    spec = MethodSpec.from_options("pdrop", False, layers="2, 7", keep="0.5,0.25")
    assert (spec.layers, spec.keep, spec.budget()) == ((2, 7), (0.5, 0.25), {})
    assert isinstance(spec.keep[0], float)
    counts = MethodSpec.from_options("pdrop", layers="2,7", keep="46,23").keep
    assert counts == (46, 23) and all(isinstance(k, int) for k in counts)
    solved_on = MethodSpec.from_options("pdrop", True, layers="2,7", flops_fraction=0.3)
    assert (solved_on.layers, solved_on.budget()) == ((2, 7), {"flops_fraction": 0.3})


def test_settings_are_part_of_the_value_and_reach_the_class():
    spec = MethodSpec.parse("random", ratio=0.2, seed=3)
    assert spec.settings == (("seed", 3),) and spec == MethodSpec("random", ratio=0.2, settings={"seed": 3})
    method = spec.build()
    assert isinstance(method, Random) and method.seed == 3
    assert MethodSpec.parse("fastv", tier=64, score_from="previous").build().score_from is ScoreFrom.PREVIOUS
    # a setting the class does not take: one error listing the ones it does
    with pytest.raises(ValueError, match=r"setting seed: FastV has no such setting; allowed: .*score_from"):
        MethodSpec.parse("fastv", tier=64, seed=3)


def test_build_is_method_from_spec():
    for spec, kwargs in [
        ("fastv", {"tier": 64}),
        ("pdrop+reroute", {"ratio": 0.111, "strict": True}),
        ("pdrop", {"layers": [2, 7], "keep": [46, 23]}),
        ("fastv", {"layers": [3], "keep": [64]}),
        ("random", {"seed": 2}),
        ("nuwa", {}),
    ]:
        assert MethodSpec.parse(spec, **kwargs).build() == method_from_spec(spec, **kwargs)
    method = MethodSpec.parse("pdrop+reroute", ratio=0.111, strict=True).build()
    assert isinstance(method, PDrop) and method.target == BudgetTarget(ratio=0.111, strict=True)
    assert MethodSpec(VANILLA).build() is None and MethodSpec.from_args("vanilla").name == "vanilla"


def test_replace_checks_again():
    spec = MethodSpec.parse("fastv", tier=64)
    assert spec.replace(reroute=True).name == "FastV + Reroute"
    with pytest.raises(ValueError, match="give one budget"):
        spec.replace(ratio=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.reroute = True  # type: ignore[misc]


def test_how_a_spec_reads():
    spec = MethodSpec.parse("fastv+reroute", tier=64)
    assert (spec.name, spec.label, spec.describe_budget()) == (
        "FastV + Reroute",
        "FastV + Reroute @ avg_T 64",
        "avg_T = 64",
    )
    assert spec.budget() == {"tier": 64}  # the edges' spelling: JSON reports, --model_args
    assert spec.model_args() == "method=fastv,reroute=true,tier=64"
    explicit = MethodSpec.parse("pdrop", layers=[2, 7], keep=[0.5, 0.25])
    assert explicit.describe_budget() == "explicit keep counts" == describe_budget({})
    assert explicit.label == "PDrop layers=[2, 7] keep=[0.5, 0.25]"
    assert MethodSpec("pdrop").describe_budget() == "the method's defaults"
    assert describe_budget({"flops_fraction": 0.25}) == "FLOPs fraction = 0.25"


# ---- errors: one line naming the value and what is allowed ------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MethodSpec.parse("nosuchmethod", tier=64), "unknown method 'nosuchmethod'; allowed: fastv"),
        (
            lambda: MethodSpec.parse("pdrop", tier=64, ratio=0.1),
            "tier=64, ratio=0.1: give one budget, not several",
        ),
        (
            lambda: MethodSpec.parse("pdrop", tier=64, keep=[3]),
            "tier=64 with keep=[3]: give a budget to solve",
        ),
        (
            lambda: MethodSpec.parse("pdrop", keep=[3]),
            "keep=[3] without layers: give the decision layers too",
        ),
        (lambda: MethodSpec.parse("pdrop", layers=[2]), "layers=[2] without keep or a budget: give keep="),
        (
            lambda: MethodSpec.parse("pdrop", tier=0),
            "BudgetTarget(avg_t=0): visual tokens per layer must be > 0",
        ),
        (
            lambda: MethodSpec.parse("pdrop", ratio=1.5),
            "BudgetTarget(ratio=1.5): a fraction must be in (0, 1]",
        ),
        (lambda: MethodSpec("fastvv"), "method='fastvv': allowed are none, fastv, pdrop, random, sparsevlm"),
        (lambda: MethodSpec(VANILLA, avg_t=64), "method=none (vanilla) takes no tier; name a method"),
        (lambda: MethodSpec(VANILLA, settings={"seed": 1}), "method=none (vanilla) takes no seed"),
        (lambda: MethodSpec(VANILLA, reroute=True), "method=none (vanilla) takes no reroute"),
        (lambda: MethodSpec.from_args("pdrop", tier="lots"), "tier='lots': give a number"),
        (lambda: MethodSpec.from_args("pdrop", "maybe", 64), "reroute='maybe': give true or false"),
        (
            lambda: MethodSpec.from_args("pdrop", layers="[2.5]", keep="[1]"),
            "layers='[2.5]': 2.5 is not an integer",
        ),
        (
            lambda: MethodSpec.from_options("fastv", tier=64, ratio=0.2),
            "--tier 64, --ratio 0.2: give one budget",
        ),
        (lambda: MethodSpec.from_options("fastv", tier=-1), "--tier -1: visual tokens per layer must be > 0"),
        (
            lambda: MethodSpec.from_options("fastv", flops_fraction=2),
            "--flops-fraction 2: a fraction must be in (0, 1]",
        ),
        (lambda: MethodSpec.from_options("pdrop", keep="46"), "--keep needs --layers (the decision layers"),
        (
            lambda: MethodSpec.from_options("pdrop", layers="2", keep="46", tier=64),
            "--tier 64 with --keep: give",
        ),
        (
            lambda: MethodSpec.from_options("pdrop", layers="2", keep="46", strict=True),
            "--strict applies to a budget",
        ),
        (
            lambda: MethodSpec.from_options("pdrop", layers="2,x"),
            "--layers '2,x': give comma-separated decoder layer",
        ),
        (
            lambda: MethodSpec.from_options("pdrop", layers="2", keep="0.5,x"),
            "--keep '0.5,x': give comma-separated",
        ),
        (lambda: MethodSpec.from_options("nuwa9"), "unknown method 'nuwa9'; allowed: fastv"),
        (lambda: MethodSpec.from_options("pdrop", layers="7,2", keep="4,2"), "PDrop"),
    ],
)
def test_errors_are_one_line_and_name_the_value(build, message):
    with pytest.raises((ValueError, TypeError)) as info:
        build()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_option_checks_run_before_the_name_is_looked_up():
    """The command line reports a bad budget before an unknown method, as it always has."""
    with pytest.raises(ValueError, match="--tier 64, --ratio 0.2"):
        MethodSpec.from_options("nope", tier=64, ratio=0.2)


def test_option_parsers():
    assert option_layers(None) is None and option_layers("2, 7,15") == [2, 7, 15]
    assert option_keep("46,0.5") == [46, 0.5]
    assert option_budget(None, None, None, False, explicit_keep=False) == {"ratio": DEFAULT_RATIO}
    assert option_budget(64, None, None, True, explicit_keep=False) == {"tier": 64}
    assert option_budget(None, None, None, False, explicit_keep=True) == {}


# ---- enums inside, strings at the edges -------------------------------------------------------


def test_score_from_is_an_enum_accepted_as_a_string():
    method = FastV(layer=2, keep=8, score_from="previous")
    assert method.score_from is ScoreFrom.PREVIOUS and method.score_from == "previous"
    assert "score_from='previous'" in repr(method)  # the repr traces and reports record is unchanged
    assert FastV(layer=2, keep=8, score_from=ScoreFrom.PREVIOUS) == method
    assert method.make_scorer().score_from is ScoreFrom.PREVIOUS
    with pytest.raises(ValueError, match=r"PDrop\(score_from='next'\): allowed are 'current'"):
        PDrop(score_from="next")
    with pytest.raises(ValueError, match=r"FastV\(score_from=\['current'\]\): allowed"):
        FastV(score_from=["current"])


def test_head_reduction_is_an_enum_accepted_as_a_string():
    scorer = LastTokenAttention(rows=3, heads="max", score_from="previous")
    assert scorer.heads is HeadReduction.MAX and scorer.score_from is ScoreFrom.PREVIOUS
    assert repr(scorer) == "LastTokenAttention(rows=3, heads='max', score_from='previous', causal=True)"
    assert LastTokenAttention(heads=HeadReduction.MAX, score_from="previous", rows=3) == scorer
    with pytest.raises(ValueError, match=r"LastTokenAttention\(score_from='next'\): allowed are 'current'"):
        LastTokenAttention(score_from="next")


def test_call_modes_print_as_before():
    from vlm_reroute.engine.calls import Call, CallMode
    from vlm_reroute.engine.compiled import SKIPPED_HOOKS

    assert Call().mode is None and f"{CallMode.PREFILL}" == "prefill"
    assert "ran this decode call" in SKIPPED_HOOKS.format(model="M", mode=CallMode.DECODE, ran=0, layers=2)


def test_a_custom_scorer_with_a_bad_score_from_is_refused():
    from vlm_reroute.scoring.base import scores_from

    class Plain:
        score_from = "previous"

    class Typo:
        score_from = "prev"

    assert scores_from(Plain()) is ScoreFrom.PREVIOUS
    with pytest.raises(ValueError, match=r"Typo\(score_from='prev'\): allowed are 'current' and 'previous'"):
        scores_from(Typo())


# ---- the loaders' shared rule -----------------------------------------------------------------


def test_both_loaders_name_an_unsupported_checkpoint_their_way():
    import transformers

    from vlm_reroute.loading import LoadError, checkpoint_class, pretrained_kwargs

    config = transformers.LlamaConfig(architectures=["LlamaForCausalLM"])
    with pytest.raises(LoadError, match=r"^'m' is a LlamaForCausalLM checkpoint; supported classes are "):
        checkpoint_class(config, "'m'")
    with pytest.raises(ValueError, match=r"^pretrained='m' is a LlamaForCausalLM checkpoint") as info:
        checkpoint_class(config, "pretrained='m'", error=ValueError)
    assert type(info.value) is ValueError
    llava = transformers.LlavaConfig(architectures=["LlavaForConditionalGeneration"])
    assert checkpoint_class(llava, "x") is transformers.LlavaForConditionalGeneration
    assert pretrained_kwargs("auto", None) == {"dtype": "auto"}
    assert pretrained_kwargs("auto", "sdpa", "auto") == {
        "dtype": "auto",
        "attn_implementation": "sdpa",
        "device_map": "auto",
    }
