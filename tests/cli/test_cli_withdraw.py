"""``withdraw_at`` (VTW, arXiv 2405.05803) through every public edge: ``MethodSpec`` and its spellings
(keywords, ``--model_args``, options), ``vlm-reroute run``/``budget``/``explain``/``bench``/``demo``
and the lmms-eval plugin; a layer at or before the last decision, or past the last layer, is one
``error:`` line at each edge."""

from __future__ import annotations

import json
import re

import pytest
from cli_support import assert_one_line_error, invoke, saved_checkpoints, saved_images

from vlm_reroute.methods import method_from_spec
from vlm_reroute.methods.spec import MethodSpec

NUM_LAYERS = 8  # the tiny checkpoints' decoder depth; PDrop + Reroute decides at [1, 2, 4, 6] there


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return saved_images(tmp_path_factory)


def model_args_dict(spec: MethodSpec) -> dict[str, str]:
    items = re.split(r",(?![^\[]*\])", spec.model_args())  # commas inside brackets stay, as in lmms-eval
    return dict(item.split("=", 1) for item in items)


# ---- the spec and its spellings (torch-free) -----------------------------------------------------
def test_every_spelling_gives_the_same_spec_and_the_method_carries_it():
    spec = MethodSpec.parse("pdrop+reroute", ratio=0.111, withdraw_at=20)
    assert spec.withdraw_at == 20 and spec.reroute and spec.settings == ()
    assert spec == MethodSpec.from_args("pdrop", "true", ratio="0.111", withdraw_at="20")
    assert spec == MethodSpec.from_options("pdrop", True, ratio=0.111, withdraw_at=20)
    assert MethodSpec.from_args(**model_args_dict(spec)) == spec  # model_args() round-trips
    assert (
        "withdraw_at=20" in spec.model_args()
        and spec.label == "PDrop + Reroute @ ratio 0.111, withdraw_at=20"
    )
    assert (
        spec.build().withdraw_at == 20
        and MethodSpec.parse("pdrop+reroute", ratio=0.111).build().withdraw_at is None
    )
    method = method_from_spec("pdrop", reroute=True, tier=64, withdraw_at=28)
    assert method.withdraw_at == 28 and method.check_depth(32) == (2, 7, 15, 23)


def test_an_explicit_schedule_and_a_composition_keep_the_withdrawal():
    fixed = MethodSpec.parse("fastv", layers=[3], keep=[64], withdraw_at=15)
    assert fixed.build().withdraw_at == 15 and fixed.label.endswith("keep=[64], withdraw_at=15")
    assert MethodSpec.from_args(**model_args_dict(fixed)) == fixed
    composed = MethodSpec.parse("visionzip+pdrop", reroute=True, ratio=0.111, withdraw_at=28).build()
    assert composed.withdraw_at == 28 and composed.then.withdraw_at == 28


@pytest.mark.parametrize(
    ("build", "fragments"),
    [
        (
            lambda: MethodSpec.parse("fastv", layers=[3], keep=[64], withdraw_at=3),
            ("withdraw_at=3", "4..L-1"),
        ),
        (lambda: MethodSpec.from_args("pdrop", layers="[2,7]", keep="[10,5]", withdraw_at=7), ("8..L-1",)),
        (lambda: MethodSpec.from_args("pdrop", tier=64, withdraw_at="x"), ("withdraw_at='x'", "integer")),
        (lambda: MethodSpec.from_args("none", withdraw_at=5), ("vanilla", "withdraw_at")),
        (lambda: MethodSpec.from_options("pdrop", True, withdraw_at=0), ("--withdraw-at 0", "≥ 1")),
        # the default layers are known once the depth is: PDrop + Reroute decides at [1, 2, 4, 6] of 8
        (
            lambda: MethodSpec.parse("pdrop+reroute", ratio=0.25, withdraw_at=6).build().check_depth(8),
            ("7..7",),
        ),
        (
            lambda: MethodSpec.parse("pdrop+reroute", ratio=0.25, withdraw_at=8).build().check_depth(8),
            ("7..7",),
        ),
    ],
)
def test_a_bad_withdraw_at_is_one_line_naming_it_and_the_range(build, fragments):
    with pytest.raises((ValueError, TypeError)) as info:
        build()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


# ---- vlm-reroute run (tiny LLaVA, 576 tokens, 8 layers) ----------------------------------------------
def run_json(*args: str) -> dict:
    result = invoke("run", *args, "--json", "--threads", "1", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def visual_per_layer(report: dict, n: int) -> list[int]:
    """Visual tokens entering each layer of the reported schedule (none from ``withdraw_at`` on)."""
    layers, keep = report["schedule"]["layers"], report["schedule"]["keep"]
    per_layer = [n] * NUM_LAYERS
    for start, end, k in zip(layers, [*layers[1:], NUM_LAYERS], keep, strict=True):
        per_layer[start:end] = [k] * (end - start)
    at = report["withdraw_at"]
    return per_layer if at is None else per_layer[:at] + [0] * (NUM_LAYERS - at)


def test_run_reports_the_withdrawal_in_its_decisions_and_kv(checkpoints, images):
    args = ["--model", checkpoints["llava"], "--image", images["big"], "--prompt", "Hi"]
    args += ["--method", "pdrop", "--reroute", "--ratio", "0.25"]
    plain, withdrawn = run_json(*args), run_json(*args, "--withdraw-at", "7")
    assert withdrawn["withdraw_at"] == 7 and plain["withdraw_at"] is None
    last = withdrawn["decisions"][-1]
    assert (last["layer"], last["kept"]) == (7, 0)  # the withdrawal: a last decision that keeps nothing
    assert (
        [d["layer"] for d in withdrawn["decisions"][:-1]] == withdrawn["schedule"]["layers"] == [1, 2, 4, 6]
    )
    assert [d["layer"] for d in plain["decisions"]] == [1, 2, 4, 6]
    (n,) = withdrawn["visual_tokens"]
    for report in (plain, withdrawn):  # the ratio is met either way ...
        assert abs(report["avg_visual_tokens"] - 0.25 * n) <= 1.0, report["avg_visual_tokens"]
    # ... so the stages before layer 7 keep more, and layer 7's cache holds no visual token
    assert sum(withdrawn["schedule"]["keep"]) > sum(plain["schedule"]["keep"])
    config = json.loads((checkpoints["llava"] / "config.json").read_text())["text_config"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token_layer = 2 * config["num_key_value_heads"] * head_dim * 4  # float32 K and V
    cached = {id(r): visual_per_layer(r, n) for r in (plain, withdrawn)}
    assert cached[id(withdrawn)][7] == 0 and cached[id(plain)][7] > 0
    # the same text in both: the KV difference is the visual tokens cached per layer, layer 7's none
    assert plain["kv_bytes"] - withdrawn["kv_bytes"] == per_token_layer * (
        sum(cached[id(plain)]) - sum(cached[id(withdrawn)])
    )
    text = invoke("run", *args, "--withdraw-at", "7", "--threads", "1", "--max-new-tokens", "1")
    assert text.exit_code == 0 and "withdrawn from layer 7" in " ".join(text.stdout.split())


@pytest.mark.parametrize(
    ("layer", "fragments"), [("6", ("withdraw_at=6", "7..7")), ("8", ("withdraw_at=8", "7..7"))]
)
def test_run_refuses_a_layer_at_the_last_decision_or_past_the_end(checkpoints, images, layer, fragments):
    result = invoke(
        "run", "--model", checkpoints["llava"], "--image", images["big"], "--prompt", "Hi",
        "--method", "pdrop", "--reroute", "--ratio", "0.25", "--withdraw-at", layer, "--threads", "1",
    )  # fmt: skip
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("command", ["run", "explain", "bench", "demo", "budget"])
def test_every_command_refuses_a_layer_below_one_before_any_work(command, tmp_path):
    model = {"budget": "llava-1.5-7b", "demo": str(tmp_path / "missing")}.get(command, str(tmp_path / "m"))
    extra = {"run": ["--image", "x.png", "--prompt", "Hi"], "explain": ["--image", "x.png", "--prompt", "Hi"]}
    extra["bench"] = ["--image", "x.png"]
    result = invoke(command, "--model", model, *extra.get(command, []), "--withdraw-at", "0")
    assert_one_line_error(result, "--withdraw-at 0", "≥ 1")


# ---- vlm-reroute budget (torch-free) -----------------------------------------------------------
def budget_json(*args: str) -> list[dict]:
    result = invoke("budget", "--model", "llava-1.5-7b", "--tier", "64", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_budget_prices_every_schedule_with_the_withdrawal():
    plain, withdrawn = budget_json(), budget_json("--withdraw-at", "29")
    assert withdrawn[0]["method"] == "vanilla" and withdrawn[0]["withdraw_at"] is None  # the reference
    assert [r["method"] for r in plain] == [r["method"] for r in withdrawn]
    for before, after in zip(plain[1:], withdrawn[1:], strict=True):
        assert after["withdraw_at"] == 29 and after["reachable"], after
        assert abs(after["avg_visual_tokens"] - 64) <= 0.5, after  # solved with layers 29..31 at 0
        assert sum(after["keep"]) >= sum(before["keep"]) and after["layers"] == before["layers"]
    fastv = next(r for r in withdrawn if r["method"] == "FastV")
    assert fastv["keep"] == [12] and next(r for r in plain if r["method"] == "FastV")["keep"] == [11]
    text = invoke("budget", "--model", "llava-1.5-7b", "--tier", "64", "--withdraw-at", "29")
    assert text.exit_code == 0 and "no visual token from layer 29 on (VTW)" in " ".join(text.stdout.split())


@pytest.mark.parametrize("layer", ["28", "20", "32"])
def test_budget_refuses_a_layer_outside_every_methods_range(layer):
    result = invoke("budget", "--model", "llava-1.5-7b", "--tier", "64", "--withdraw-at", layer)
    assert_one_line_error(result, f"--withdraw-at {layer}", "29..31", "32 layers")


# ---- the lmms-eval plugin ------------------------------------------------------------------------
def test_the_plugin_takes_withdraw_at_and_refuses_a_bad_one(checkpoints):
    from vlm_reroute.eval.model import VlmReroute

    base = f"pretrained={checkpoints['llava']},method=pdrop,reroute=true,ratio=0.25"
    lm = VlmReroute.create_from_arg_string(f"{base},withdraw_at=7", {"device": "cpu"})
    assert lm.spec == MethodSpec("pdrop", True, ratio=0.25, withdraw_at=7)
    assert lm._method.withdraw_at == 7 and "withdraw_at=7" in lm.spec.model_args()
    with pytest.raises(ValueError, match=r"withdraw_at=8\).*7\.\.7") as info:
        VlmReroute.create_from_arg_string(f"{base},withdraw_at=8", {"device": "cpu"})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="withdraw_at='seven': give a decoder layer index"):
        VlmReroute.create_from_arg_string(f"{base},withdraw_at=seven", {"device": "cpu"})
    with pytest.raises(
        ValueError, match=r"unknown model_args \['withdraw'\]; allowed are .*keep, withdraw_at, dtype"
    ):
        VlmReroute.create_from_arg_string(f"{base},withdraw=7", {"device": "cpu"})


# ---- explain --compare: both twins keep the withdrawal -------------------------------------------
def test_explain_compare_keeps_the_withdrawal_in_both_modes(checkpoints, images, tmp_path):
    result = invoke(
        "explain", "--model", checkpoints["llava"], "--image", images["big"], "--prompt", "Hi",
        "--method", "pdrop", "--reroute", "--ratio", "0.25", "--withdraw-at", "7", "--compare",
        "--json", "--no-scores", "--out", tmp_path / "r.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["methods"] == ["PDrop + Reroute", "PDrop"] and report["decision_layers"] == [1, 2, 4, 6, 7]


def test_the_twins_of_a_withdrawing_method_withdraw_too():
    from vlm_reroute.comparison import twin_method

    fastv = method_from_spec("fastv", reroute=True, layers=[1, 2], keep=[64, 64], withdraw_at=5)
    pdrop = method_from_spec("pdrop", layers=[1, 2], keep=[64, 32], withdraw_at=5)
    for method in (fastv, pdrop):
        twin = twin_method(method)
        assert twin.reroute is not method.reroute and twin.withdraw_at == 5
