"""The command line's offline parts: ``budget`` (absolute and relative budgets, unreachable
methods marked, known Hub ids, local folders, every value whole at any width), one-line usage
errors, only our own warnings relayed, ``--version``, ``python -m vlm_reroute``, output paths
checked first."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cli_support import assert_one_line_error, invoke, saved_checkpoints

import vlm_reroute
from vlm_reroute import __version__
from vlm_reroute.budget import compute_budget, load_shape
from vlm_reroute.budget.solver import UnreachableTargetWarning
from vlm_reroute.cli.app import our_warnings

METHODS = [
    "vanilla",
    "FastV",
    "FastV + Reroute",
    "PDrop",
    "PDrop + Reroute",
    "SparseVLM",
    "SparseVLM + Reroute",
    "DART",
    "DART + Reroute",
    "Nüwa",
    "Nüwa + Reroute",
    "DivPrune",  # vision-side methods alone: one row (their reroute form runs what prune runs)
    "VisionZip",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


def avg_t(layers: list[int], keep: list[int], n: int, num_layers: int) -> float:
    """Mean visual tokens per layer of a schedule, by hand."""
    ends = [*layers[1:], num_layers]
    return (layers[0] * n + sum(k * (b - a) for k, a, b in zip(keep, layers, ends, strict=True))) / num_layers


def budget_json(*args: str) -> list[dict]:
    result = invoke("budget", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_budget_json_hits_an_absolute_tier_for_every_method():
    rows = budget_json("--model", "llava-1.5-7b", "--tier", "64")
    assert [r["method"] for r in rows] == METHODS
    assert rows[0]["avg_visual_tokens"] == 576 and rows[0]["budget"] is None
    for row in rows[1:]:
        assert row["reachable"] and row["budget"] == {"tier": 64}
        assert abs(avg_t(row["layers"], row["keep"], 576, 32) - 64) <= 0.5
        assert row["reroute"] == row["method"].endswith("Reroute")
        assert row["tflops"] < rows[0]["tflops"] and row["kv_bytes"] < rows[0]["kv_bytes"]
    assert rows[1]["layers"] == [3] and rows[2]["layers"] == [3, 7, 15, 23]
    assert len(set(rows[2]["keep"])) == 1  # FastV + Reroute: FastV's count at every re-decision
    a = rows[4]["keep"][0]
    assert (
        rows[4]["keep"][1] == a
        and abs(rows[4]["keep"][2] - a / 2) <= 1
        and abs(rows[4]["keep"][3] - a / 4) <= 1
    )


def test_relative_budgets_ratio_and_flops_fraction():
    shape = load_shape("qwen2.5-vl-7b")
    rows = budget_json("--model", "qwen2.5-vl-7b", "--ratio", "0.25", "--n-visual", "300")
    for row in rows[1:]:
        assert row["budget"] == {"ratio": 0.25} and row["n_visual"] == 300
        assert abs(avg_t(row["layers"], row["keep"], 300, 28) - 75) <= 0.5  # 0.25 x 300 tokens
    rows = budget_json("--model", "qwen2.5-vl-7b", "--flops-fraction", "0.3", "--n-text", "40")
    for row in rows[1:]:
        # PyramidDrop-convention FLOPs of the schedule, recomputed from its layers and keep counts
        own = compute_budget(shape, 576, 40, row["layers"], row["keep"], row["reroute"])
        assert own.flops_pdrop_ratio == pytest.approx(row["flops_pdrop_ratio"])
        assert abs(own.flops_pdrop_ratio - 0.3) < 0.01


def test_default_budget_is_the_ratio_of_64_in_576():
    rows = budget_json("--model", "llava-1.5-7b")
    assert all(r["budget"] == {"ratio": 0.111} for r in rows[1:])
    assert all(abs(r["avg_visual_tokens"] - 0.111 * 576) <= 0.5 for r in rows[1:])


def test_unreachable_methods_are_marked_with_their_range_and_others_still_solved():
    # FastV on 32 layers cannot go below (3 x 576 + 29 x 1) / 32 = 54.91 tokens per layer
    floor = (3 * 576 + 29) / 32
    rows = budget_json("--model", "llava-1.5-7b", "--tier", "50")
    by_name = {r["method"]: r for r in rows}
    for name in ("FastV", "FastV + Reroute"):
        row = by_name[name]
        assert not row["reachable"] and row["reachable_avg_t"][0] == pytest.approx(floor)
        assert row["avg_visual_tokens"] == pytest.approx(floor) and "54.91..576.00" in row["note"]
    for name in ("PDrop", "PDrop + Reroute"):
        assert by_name[name]["reachable"] and abs(by_name[name]["avg_visual_tokens"] - 50) <= 0.5
    table = invoke("budget", "--model", "llava-1.5-7b", "--tier", "50")
    assert table.exit_code == 0
    assert "FastV *" in table.stdout and "FastV + Reroute *" in table.stdout and "PDrop *" not in table.stdout
    assert "54.91..576.00" in table.stdout and "PDrop + Reroute" in table.stdout
    strict = invoke("budget", "--model", "llava-1.5-7b", "--tier", "50", "--strict")
    line = assert_one_line_error(strict, "FastV:", "FastV + Reroute:", "54.91..576.00")
    assert "PDrop" not in line


def table_cells(stdout: str) -> dict[str, dict]:
    """The budget table read back by column: per method (with its ``*``), the layer and keep lists
    joined over the lines they were broken into, and the five numbers."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method "))
    at = {name: lines[header].index(name) for name in ("layers", "keep", "avg_T")}
    cells: dict[str, dict] = {}
    for line in lines[header + 1 :]:
        if line.startswith("visual tokens per image"):
            break
        if not line.startswith(" "):
            name = line[: at["layers"]].strip()
            cells[name] = {"layers": "", "keep": "", "numbers": line[at["avg_T"] :].split()}
        cells[name]["layers"] += line[at["layers"] : at["keep"]].strip()
        cells[name]["keep"] += line[at["keep"] : at["avg_T"]].strip()
    return cells


@pytest.mark.parametrize("tier", ["64", "50"])
@pytest.mark.parametrize("columns", [None, "80", "200", "40"])
def test_the_budget_table_prints_every_value_whole_at_any_width(tier, columns):
    # piped (no COLUMNS: rich assumes 80) or an 80-column terminal used to give "576…", "323…"
    args = ("--model", "llava-1.5-7b", "--tier", tier)
    rows = budget_json(*args)
    result = invoke("budget", *args, env={"COLUMNS": columns})
    assert result.exit_code == 0 and "…" not in result.stdout
    if columns != "40":  # narrower than the table can get: lines run longer rather than cut a value
        assert max(len(line.rstrip()) for line in result.stdout.splitlines()) <= int(columns or 80)
    cells = table_cells(result.stdout)
    assert len(cells) == len(rows) == len(METHODS)
    for row in rows:
        cell = cells[row["method"] + ("" if row["reachable"] else " *")]
        assert cell["layers"] == (",".join(map(str, row["layers"])) or "-")
        assert cell["keep"] == (",".join(map(str, row["keep"])) or "-")
        assert cell["numbers"] == [
            f"{row['avg_visual_tokens']:.1f}",
            f"{row['tflops']:.3f}",
            f"{row['kv_bytes'] / 1e6:.1f}",
            f"{1 - row['flops_ratio']:.0%}",
            f"{1 - row['kv_ratio']:.0%}",
        ]


def test_only_this_packages_warnings_become_warning_lines(capsys):
    # transformers warns with a stacklevel, so its deprecation notice is attributed to our engine's file
    engine_file = str(Path(vlm_reroute.__file__).parent / "engine" / "calls.py")
    clamped = "target avg_T=64 is not reachable; using 72.88"
    with our_warnings() as shown:
        warnings.warn_explicit("`past_key_values` is deprecated, use `cache`", FutureWarning, engine_file, 1)
        warnings.warn_explicit("old", DeprecationWarning, engine_file, 2, module="vlm_reroute.engine.calls")
        warnings.warn("a library's own note", UserWarning, stacklevel=1)
        for _ in range(2):
            warnings.warn(clamped, UnreachableTargetWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == [f"warning: {clamped}"]
    assert shown == [clamped]


def test_a_known_hub_id_resolves_to_its_shipped_shape():
    assert budget_json("--model", "llava-hf/llava-1.5-7b-hf") == budget_json("--model", "llava-1.5-7b")
    assert budget_json("--model", "qwen/qwen2.5-vl-7b-instruct") == budget_json("--model", "qwen2.5-vl-7b")


def test_local_folders_small_models_get_a_fitting_unit_and_text_only_models_are_refused(
    checkpoints, tmp_path
):
    rows = budget_json("--model", checkpoints["llava"], "--tier", "200")
    assert rows[0]["n_visual"] == 576  # (336 / 14)^2 from the folder's vision config
    table = invoke("budget", "--model", checkpoints["llava"], "--tier", "200")
    assert table.exit_code == 0 and "MFLOPs" in table.stdout and "TFLOPs" not in table.stdout
    assert " 0.000 " not in table.stdout
    qwen = budget_json("--model", checkpoints["qwen2_vl"], "--tier", "200")
    assert qwen[0]["n_visual"] == 451584 // 28**2  # the processor's pixel cap / merged patch
    llama = tmp_path / "llama"
    llama.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}  # fmt: skip
    (llama / "config.json").write_text(json.dumps(config))
    assert_one_line_error(invoke("budget", "--model", llama), "text-only", "LlamaForCausalLM")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model", "llava-9b"], ["unknown model 'llava-9b'", "llava-1.5-7b", "llava-hf/llava-1.5-7b-hf"]),
        (["--model", "llava-1.5-7b", "--n-visual", "0"], ["--n-visual", "greater than or equal to 1"]),
        (["--model", "llava-1.5-7b", "--n-visual", "-5"], ["--n-visual", "greater than or equal to 1"]),
        (["--model", "llava-1.5-7b", "--tier", "64", "--ratio", "0.1"], ["one budget"]),
        (["--model", "llava-1.5-7b", "--ratio", "1.5"], ["--ratio 1.5", "(0, 1]"]),
        (["--model", "llava-1.5-7b", "--tier", "0"], ["--tier 0", "> 0"]),
        (["--model", "llava-1.5-7b", "--tierr", "64"], ["No such option: --tierr", "--help"]),
        ([], ["Missing option '--model'"]),
    ],
)
def test_budget_errors_are_one_line(args, fragments):
    assert_one_line_error(invoke("budget", *args), *fragments)


def test_output_is_checked_before_any_work_and_holds_the_json(tmp_path):
    missing = invoke("budget", "--model", "llava-1.5-7b", "--output", tmp_path / "no" / "r.json")
    assert_one_line_error(missing, "does not exist")
    assert_one_line_error(invoke("budget", "--model", "llava-1.5-7b", "--output", tmp_path), "is a folder")
    out = tmp_path / "budget.json"
    result = invoke("budget", "--model", "llava-1.5-7b", "--output", out)
    assert result.exit_code == 0 and "PDrop" in result.stdout  # the table still prints
    assert json.loads(out.read_text()) == budget_json("--model", "llava-1.5-7b")


def test_version_and_python_dash_m_without_torch():
    assert invoke("--version").stdout.splitlines()[0] == f"vlm-reroute {__version__}"
    code = (
        "import runpy, sys; sys.argv = ['vlm-reroute', 'budget', '--model', 'llava-1.5-7b', '--json']\n"
        "try:\n    runpy.run_module('vlm_reroute', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["method"] for r in json.loads(done.stdout)] == METHODS
    code = "import runpy, sys; sys.argv = ['vlm-reroute', '--version']\n"
    code += "try:\n    runpy.run_module('vlm_reroute', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    code += "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"vlm-reroute {__version__}"
    libraries = [line.split()[0] for line in shown.stdout.splitlines()[1:]]
    assert libraries == ["transformers", "torch", "lmms-eval"]


def test_budget_lists_every_method_with_the_published_tiers_of_the_new_ones():
    """Issue 19's 'Done means': every registered method has a row at ratio 0.111, and DART's /
    VisionZip's / DivPrune's published tiers are given at code level beside ours (methods.md §2)."""
    result = invoke("budget", "--model", "llava-1.5-7b", "--ratio", "0.111", "--json")
    assert result.exit_code == 0, result.output
    names = {r["method"] for r in json.loads(result.stdout)}
    assert set(METHODS) <= names
    from vlm_reroute.methods import method_class, method_names

    labels = {method_class(k, False)[0].display for k in method_names() if k != "random"}
    assert labels <= names
    text = " ".join(invoke("budget", "--model", "llava-1.5-7b", "--ratio", "0.111").stdout.split())
    assert 'DART\'s published tiers run avg_T "64" 99.75, "128" 159.75, "192" 219.75' in text
    assert 'DivPrune\'s published tiers run avg_T "0.098" 56' in text
