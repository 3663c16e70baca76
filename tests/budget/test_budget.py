"""Budget arithmetic: sanity facts from the papers, conventions, config parsing, validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlm_reroute.budget import (
    ModelShape,
    avg_visual_tokens,
    compute_budget,
    flops,
    known_models,
    kv_bytes_per_token,
    layer_flops,
    load_model_info,
    load_shape,
)

SRC = Path(__file__).resolve().parents[2] / "src"
KIB, MIB, T = 1024, 1024**2, 1e12


def pdrop_layer(n: int, d: int, m: int) -> int:
    """PyramidDrop's per-layer MACs, written out independently of the package."""
    return 4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m


@pytest.fixture(scope="module")
def llava7b() -> ModelShape:
    return load_shape("llava-1.5-7b")


@pytest.fixture(scope="module")
def qwen7b() -> ModelShape:
    return load_shape("qwen2.5-vl-7b")


# ---- sanity facts ---------------------------------------------------------------------------


def test_vanilla_llava7b_prefill_is_3_82_tmacs(llava7b):
    expected = 32 * pdrop_layer(576, 4096, 11008)
    got = flops(llava7b, 576, n_text=999, convention="pdrop", count_text=False)
    assert got == expected
    assert abs(got / T - 3.82) <= 0.005


def test_original_pyramiddrop_schedule_is_1_78_tmacs(llava7b):
    expected = 8 * sum(pdrop_layer(n, 4096, 11008) for n in (576, 288, 144, 72))
    got = flops(llava7b, 576, 0, [8, 16, 24], [288, 144, 72], convention="pdrop", count_text=False)
    assert got == expected
    assert abs(got / T - 1.78) <= 0.005
    budget = compute_budget(llava7b, 576, 0, [8, 16, 24], [288, 144, 72])
    assert budget.flops_pdrop == expected
    assert budget.vanilla_flops_pdrop == 32 * pdrop_layer(576, 4096, 11008)


def test_fastv_readme_ratio_needs_text_tokens(llava7b):
    # FastV README: K=3, R=50% => "FLOPs 57%"; only with ~35 prompt tokens in n (54% with n=576).
    with_text = compute_budget(llava7b, 576, 35, [3], [288])
    image_only = compute_budget(llava7b, 576, 0, [3], [288])
    assert round(100 * with_text.flops_fastv_ratio) == 57
    assert round(100 * image_only.flops_fastv_ratio) == 54


@pytest.mark.parametrize(
    ("name", "kib"),
    [("llava-1.5-7b", 512), ("qwen2.5-vl-7b", 56), ("qwen2.5-vl-3b", 36), ("qwen2-vl-7b", 56)],
)
def test_kv_bytes_per_token(name, kib):
    shape = load_shape(name)
    assert kv_bytes_per_token(shape) == kib * KIB
    # one text token, no image: the budget's KV bytes are that same per-token figure
    assert compute_budget(shape, 0, 1).kv_bytes == kib * KIB


def test_llava_image_kv_is_288_mib(llava7b):
    assert compute_budget(llava7b, 576, 0).kv_bytes == 288 * MIB


# ---- conventions ----------------------------------------------------------------------------


def test_exact_equals_pdrop_for_mha_and_is_smaller_for_gqa(llava7b, qwen7b):
    for n in (1, 100, 617):
        assert layer_flops(llava7b, n, "exact") == layer_flops(llava7b, n, "pdrop")
        assert layer_flops(qwen7b, n, "exact") < layer_flops(qwen7b, n, "pdrop")


def test_exact_gqa_formula(qwen7b):
    n, d, m = 600, 3584, 18944
    qo = 2 * n * d * (28 * 128)
    kv = 2 * n * d * (4 * 128)
    attn = 2 * n * n * (28 * 128)
    assert layer_flops(qwen7b, n, "exact") == qo + kv + attn + 3 * n * d * m


def test_fastv_and_pdrop_differ_only_in_ffn(llava7b):
    n = 300
    assert layer_flops(llava7b, n, "pdrop") - layer_flops(llava7b, n, "fastv") == n * 4096 * 11008


def test_ungated_ffn_in_exact():
    gated = ModelShape("g", 2, 64, 256, 4, 4, 16)
    plain = ModelShape("p", 2, 64, 256, 4, 4, 16, gated_ffn=False)
    assert layer_flops(gated, 10, "exact") - layer_flops(plain, 10, "exact") == 10 * 64 * 256


def test_unknown_convention(llava7b):
    with pytest.raises(ValueError, match="allowed: fastv, pdrop, exact"):
        layer_flops(llava7b, 10, "mine")


def test_rows_and_totals(llava7b):
    n_text = 40
    b = compute_budget(llava7b, 576, n_text, [2, 7], [300, 100], reroute=True)
    assert len(b.rows) == 32
    visual = [r.visual_tokens for r in b.rows]
    assert visual == [576] * 2 + [300] * 5 + [100] * 25
    assert all(r.text_tokens == n_text and r.kv_tokens == n_text + r.visual_tokens for r in b.rows)
    assert b.rows[0].flops_pdrop == pdrop_layer(n_text + 576, 4096, 11008)
    assert b.flops_pdrop == sum(pdrop_layer(n_text + v, 4096, 11008) for v in visual)
    assert b.kv_tokens == sum(n_text + v for v in visual)
    assert b.kv_bytes == b.kv_tokens * 2 * 32 * 128 * 2
    assert b.avg_visual_tokens == pytest.approx((2 * 576 + 5 * 300 + 25 * 100) / 32)
    assert b.avg_t == b.avg_visual_tokens
    assert b.token_reduction == pytest.approx(1 - b.avg_t / 576)
    assert b.kv_bytes_ratio == pytest.approx(b.kv_tokens / (32 * (n_text + 576)))
    assert 0 < b.flops_exact_ratio < 1 and 0 < b.flops_fastv_ratio < 1
    d = b.to_dict(rows=False)
    assert "rows" not in d and d["keep"] == [300, 100] and d["flops_pdrop_ratio"] == b.flops_pdrop_ratio
    json.dumps(b.to_dict())


def test_vanilla_ratios_are_one(qwen7b):
    b = compute_budget(qwen7b, 576, 20)
    assert b.avg_t == 576 and b.layers == () and b.flops_scoring == 0
    assert b.flops_pdrop_ratio == b.flops_exact_ratio == b.flops_fastv_ratio == b.kv_bytes_ratio == 1


def test_several_images(llava7b):
    one = compute_budget(llava7b, 576, 10, [3], [100])
    two = compute_budget(llava7b, 576, 10, [3], [100], num_images=2)
    assert two.avg_t == one.avg_t  # avg_T is per image
    assert two.rows[5].visual_tokens == 200 and two.rows[0].kv_tokens == 10 + 2 * 576
    assert two.kv_tokens - one.kv_tokens == one.kv_tokens - 32 * 10


def test_reroute_changes_only_scoring(llava7b):
    layers, keep = [2, 7, 15, 23], [259, 259, 129, 64]
    prune = compute_budget(llava7b, 576, 30, layers, keep, reroute=False)
    reroute = compute_budget(llava7b, 576, 30, layers, keep, reroute=True)
    assert prune.rows == reroute.rows and prune.kv_bytes == reroute.kv_bytes
    assert reroute.flops_scoring > prune.flops_scoring > 0  # reroute scores every visual token again


def test_avg_visual_tokens_function():
    assert avg_visual_tokens(4, 8, [1, 3], [4, 2]) == (8 + 4 + 4 + 2) / 4
    assert avg_visual_tokens(4, 8, [], []) == 8


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "keep", "reroute", "match"),
    [
        ([32], [10], False, r"layer 32 is out of range.*1\.\.31"),
        ([-1], [10], False, r"layer -1 is out of range"),
        ([0], [10], False, r"layer 0 is out of range; decision layers start at 1"),
        ([7, 3], [10, 5], False, r"layers=\[7, 3\]\): decision layers must be strictly increasing"),
        ([3, 3], [10, 5], False, r"strictly increasing"),
        ([3, 7], [10], False, r"one keep entry per decision layer is needed \(2 layers, 1 keep entries\)"),
        ([3], [0], False, r"keep=0\): a token count must be ≥ 1"),
        ([3], [577], False, r"an image has only 576 visual tokens; a count must be in 1\.\.576"),
        ([3, 7], [10, 20], False, r"keep counts must not increase"),
    ],
)
def test_bad_schedules(llava7b, layers, keep, reroute, match):
    with pytest.raises(ValueError, match=match):
        compute_budget(llava7b, 576, 0, layers, keep, reroute)


def test_increasing_counts_allowed_under_reroute(llava7b):
    assert compute_budget(llava7b, 576, 0, [3, 7], [10, 20], reroute=True).rows[7].visual_tokens == 20


def test_keep_ratios_resolve_like_the_runtime(llava7b):
    # one Schedule for budget and runtime: a ratio keeps max(1, int(n * f)) tokens of each image
    assert compute_budget(llava7b, 576, 0, [3], [0.5]).keep == (288,)
    with pytest.raises(TypeError, match="a keep entry is an int"):
        compute_budget(llava7b, 576, 0, [3], ["half"])


# ---- shapes and configs ---------------------------------------------------------------------

SPEC = {
    # name: (layers, hidden, ffn, heads, kv heads, dtype bytes, hub id)
    "llava-1.5-7b": (32, 4096, 11008, 32, 32, 2, "llava-hf/llava-1.5-7b-hf"),
    "llava-1.5-13b": (40, 5120, 13824, 40, 40, 2, "llava-hf/llava-1.5-13b-hf"),
    "qwen2-vl-7b": (28, 3584, 18944, 28, 4, 2, "Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2.5-vl-3b": (36, 2048, 11008, 16, 2, 2, "Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2.5-vl-7b": (28, 3584, 18944, 28, 4, 2, "Qwen/Qwen2.5-VL-7B-Instruct"),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_shipped_shapes(name):
    info = load_model_info(name)
    s = info.shape
    assert (
        s.num_layers,
        s.hidden_size,
        s.intermediate_size,
        s.num_heads,
        s.num_kv_heads,
        s.dtype_bytes,
    ) == SPEC[name][:6]
    assert s.head_dim == 128 and s.gated_ffn and s.name == name
    assert info.hub_id == SPEC[name][6]
    assert info.default_visual_tokens == 576
    if name.startswith("qwen"):
        assert "451584" in info.visual_tokens_note


def test_known_models_and_unknown_name():
    # SPEC checks the original shapes; the newer families' files are checked in test_families_tiny.py
    assert set(SPEC) <= set(known_models())
    assert all(load_model_info(n).shape.num_layers > 0 for n in known_models())
    with pytest.raises(ValueError, match="known models: .*llava-1.5-7b.*qwen2.5-vl-7b"):
        load_shape("llava-2-7b")
    with pytest.raises(ValueError, match="unknown model"):
        load_model_info("nope")


LLAVA_CFG = {
    "_name_or_path": "llava-hf/llava-1.5-7b-hf",
    "model_type": "llava",
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "torch_dtype": "float16",
}
QWEN_OLD_CFG = {  # older Qwen2.5-VL config.json: decoder fields at the top level
    "model_type": "qwen2_5_vl",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1280, "depth": 32},
}
QWEN_V5_CFG = {  # transformers 5: decoder under text_config (dtype None there), dtype at top level
    "model_type": "qwen2_5_vl",
    "dtype": "bfloat16",
    "text_config": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "dtype": None,
    },
}


def test_from_config_dicts():
    assert ModelShape.from_config(LLAVA_CFG) == ModelShape(
        "llava-hf/llava-1.5-7b-hf", 32, 4096, 11008, 32, 32, 128, 2, True
    )
    assert ModelShape.from_config(QWEN_OLD_CFG, name="q3") == ModelShape(
        "q3", 36, 2048, 11008, 16, 2, 128, 2, True
    )
    v5 = ModelShape.from_config(QWEN_V5_CFG, name="qwen2.5-vl-7b")
    assert v5 == load_shape("qwen2.5-vl-7b")


def test_from_config_object_and_dtypes():
    class FakeConfig:  # mimics PretrainedConfig: attributes plus to_dict()
        def __init__(self, **kw):
            self.__dict__.update(kw)

        def to_dict(self):
            return {k: (v.to_dict() if isinstance(v, FakeConfig) else v) for k, v in self.__dict__.items()}

    text = FakeConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, head_dim=32
    )
    cfg = FakeConfig(text_config=text, dtype="torch.float32", model_type="tiny")
    shape = ModelShape.from_config(cfg)
    assert (shape.head_dim, shape.num_kv_heads, shape.dtype_bytes, shape.name) == (32, 4, 4, "tiny")
    plain = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    assert ModelShape.from_config(plain, name="x").head_dim == 4
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        ModelShape.from_config({**QWEN_OLD_CFG, "torch_dtype": "float8"})
    with pytest.raises(ValueError, match="no 'intermediate_size'"):
        ModelShape.from_config({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2})


def test_from_config_path(tmp_path):
    model_dir = tmp_path / "my-llava"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({**LLAVA_CFG, "_name_or_path": ""}))
    from_dir = load_shape(model_dir)
    from_file = load_shape(str(model_dir / "config.json"))
    assert from_dir == from_file and from_dir.name == "my-llava" and from_dir.num_layers == 32
    with pytest.raises(ValueError, match="known models"):
        load_shape(str(tmp_path / "missing"))


def test_imports_neither_torch_nor_transformers():
    # Load the modules under a stub package so that vlm_reroute/__init__.py does not count; neither
    # the budget arithmetic nor the methods that register their schedule rules with it may pull
    # torch / transformers in themselves.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('vlm_reroute'); pkg.__path__ = [{str(SRC / 'vlm_reroute')!r}]\n"
        "sys.modules['vlm_reroute'] = pkg\n"
        "import vlm_reroute.budget, vlm_reroute.budget.solver, vlm_reroute.budget.presets\n"
        "import vlm_reroute.methods\n"
        "vlm_reroute.budget.presets.preset('llava-1.5-7b', 64, 'pdrop', True)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_from_real_transformers_configs():
    transformers = pytest.importorskip("transformers")
    llava = transformers.LlavaConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
        },
        dtype="float16",
    )
    assert ModelShape.from_config(llava, name="llava-1.5-13b") == load_shape("llava-1.5-13b")
    # decoder fields given at the top level, as in older Qwen2.5-VL config.json files
    qwen = transformers.Qwen2_5_VLConfig(**{k: v for k, v in QWEN_OLD_CFG.items() if k != "vision_config"})
    assert ModelShape.from_config(qwen, name="qwen2.5-vl-3b") == load_shape("qwen2.5-vl-3b")
