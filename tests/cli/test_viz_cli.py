"""``vlm-reroute explain`` end to end on saved tiny checkpoints (LLaVA, Qwen2.5-VL): pictures,
counts and box shares; the budget options of ``run`` and ``bench``; checks before the model loads."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from cli_support import assert_one_line_error
from PIL import Image
from typer.testing import CliRunner

import vlm_reroute.loading
from vlm_reroute.adapters.layout import GridView, ImageLayout
from vlm_reroute.adapters.llava import LlavaAdapter
from vlm_reroute.budget import load_shape
from vlm_reroute.budget.solver import UnreachableTargetWarning, solve_for_target
from vlm_reroute.cli import app
from vlm_reroute.methods import method_from_spec
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    picture = root / "grey.png"
    Image.new("RGB", (200, 150), (120, 120, 120)).save(picture)
    llava = save_tiny_checkpoint("llava", root / "llava", image_size=112)  # 8×8 cells
    qwen = save_tiny_checkpoint("qwen2_5_vl", root / "qwen")  # 200×150 -> 5×7 merged cells
    return root, picture, {"llava": llava, "qwen2_5_vl": qwen}


def explain(*args):
    result = runner.invoke(app, ["explain", *map(str, args)])
    return result, " ".join(result.output.split())


def test_llava_compare_gif_box_json(files):
    root, picture, ckpt = files
    # By hand: 200×150 -> 149×112 -> crop columns 18..130, so the frame is x 24.16..174.5 of the
    # original and cells are 18.79 × 18.75 px. The box spans cells 2..4 × 1..3 plus 20 % of a cell
    # on every side (neighbours overlap 20 % < 50 %: outside).
    cw, ch = 150.34 / 8, 150 / 8
    x0 = 24.16
    box = (x0 + 1.8 * cw, 0.8 * ch, x0 + 5.2 * cw, 4.2 * ch)
    out = root / "llava.png"
    result, text = explain(
        "--model", ckpt["llava"], "--image", picture, "--prompt", "What is it?", "--layers", "2,4,6",
        "--keep", "24,24,12", "--compare", "--gif", "--box", ",".join(f"{v:.2f}" for v in box),
        "--json", "--dpi", 30, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, text
    report = json.loads(result.output)
    assert report["methods"] == ["PDrop + Reroute", "PDrop"]
    assert report["files"] == [str(out), str(out.with_suffix(".gif"))]
    assert Image.open(out).size[0] > 100 and Image.open(out.with_suffix(".gif")).n_frames == 3
    (sample,) = report["samples"]
    image = sample["images"][0]
    assert image["grid"] == [8, 8] and image["frame"][0] == pytest.approx(x0, abs=0.01)
    assert sample["box"]["cells"] == 9
    shares = sample["box"]["runs"]
    for label, decisions in image["decisions"].items():
        token_share = shares[label]["token_share"]
        assert token_share[:2] == [1, 1] and shares[label]["box_share"][:2] == [1, 1]
        for d in decisions:  # the layer's tokens are the decision's kept + re-entered
            assert token_share[d["layer"]] == pytest.approx((d["kept"] + d["re-entered"]) / 64, abs=1e-6)
    prune = shares["PDrop"]["box_share"]
    assert all(a >= b for a, b in zip(prune, prune[1:], strict=False))  # pruned cells never return
    assert [round(s * 9) for s in prune] == pytest.approx([s * 9 for s in prune], abs=1e-4)  # ninths


def test_qwen_batch_sample_and_text_output(files):
    root, picture, ckpt = files
    out = root / "qwen.png"
    args = ["--model", ckpt["qwen2_5_vl"], "--image", picture, "--image", picture, "--prompt", "One?"]
    args += ["--prompt", "And two?", "--tier", 20, "--box", "0,0,95,90", "--box-image", 1, "--dpi", 30]
    result, text = explain(*args, "--sample", 1, "--json", "--out", out, "--no-scores")
    assert result.exit_code == 0, text
    report = json.loads(result.output)
    assert report["files"] == [str(out)] and [s["sample"] for s in report["samples"]] == [1]
    (sample,) = report["samples"]
    assert [im["grid"] for im in sample["images"]] == [[5, 7], [5, 7]]
    # whole-picture cells of 200/7 = 28.6 × 30 px: the box holds columns 0..2 (the 4th overlaps it by
    # 9.3 px, 33 %) and rows 0..2
    assert sample["box"]["cells"] == 9 and sample["box"]["image"] == 1
    result, text = explain(*args, "--out", out, "--no-scores")
    assert result.exit_code == 0, text
    assert "wrote" in text and (root / "qwen-sample0.png").is_file() and (root / "qwen-sample1.png").is_file()
    assert "PDrop + Reroute: 100% →" in text


def selected(report: dict, label: str) -> list[tuple[int, int]]:
    """(layer, tokens that went on) per decision of the first image: kept + re-entered."""
    decisions = report["samples"][0]["images"][0]["decisions"][label]
    return [(d["layer"], d["kept"] + d["re-entered"]) for d in decisions]


def solved(shape, **budget) -> list[tuple[int, int]]:
    """(layer, tokens kept) per decision of PDrop + Reroute solved for ``budget`` on one 64-token image."""
    schedule = method_from_spec("pdrop", reroute=True, **budget).resolve(shape, 64)
    return list(zip(schedule.layers, schedule.keep, strict=True))


def test_budget_options_and_defaults_are_those_of_run_and_bench(files):
    root, picture, ckpt = files
    args = ["--model", ckpt["llava"], "--image", picture, "--prompt", "?", "--dpi", 20, "--no-scores"]
    args.append("--json")
    shape = load_shape(ckpt["llava"])  # 8 layers, 64 visual tokens
    solve_for_target.cache_clear()  # the solver warns once per process and target; this test counts it
    result, text = explain(*args, "--out", root / "default.png")  # --ratio 0.111 is out of reach here
    assert result.exit_code == 0, text
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("warning: ") and "ratio = 0.111" in line and "not reachable" in line
    with warnings.catch_warnings():  # the nearest reachable schedule, as run and bench use
        warnings.simplefilter("ignore", UnreachableTargetWarning)
        nearest = solved(shape, ratio=0.111)
    assert selected(json.loads(result.stdout), "PDrop + Reroute") == nearest
    strict, text = explain(*args, "--strict", "--out", root / "strict.png")
    assert_one_line_error(strict, "not reachable", "PDrop + Reroute")
    by_tier, text = explain(*args, "--tier", 20, "--out", root / "tier.png")
    by_ratio, _ = explain(*args, "--ratio", 20 / 64, "--out", root / "ratio.png")
    assert by_tier.exit_code == by_ratio.exit_code == 0, text
    tier = selected(json.loads(by_tier.stdout), "PDrop + Reroute")
    assert tier == selected(json.loads(by_ratio.stdout), "PDrop + Reroute")
    assert tier == solved(shape, tier=20)
    # a FLOPs budget with --compare: solved once, so both modes run the same tokens per layer
    flops, text = explain(*args, "--flops-fraction", 0.5, "--compare", "--out", root / "flops.png")
    assert flops.exit_code == 0, text
    report = json.loads(flops.stdout)
    assert report["methods"] == ["PDrop + Reroute", "PDrop"]
    assert selected(report, "PDrop + Reroute") == selected(report, "PDrop")
    assert selected(report, "PDrop") == solved(shape, flops_fraction=0.5)


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--out", "{root}/missing/x.png"], ["--out", "does not exist"]),
        (["--out", "{root}"], ["--out", "is a folder"]),
        (["--tier", "20", "--ratio", "0.3"], ["--tier 20", "--ratio 0.3", "one budget"]),
        (["--keep", "9"], ["--keep needs --layers"]),
        (["--ratio", "2"], ["--ratio 2", "(0, 1]"]),
    ],
)
def test_paths_and_budgets_are_checked_before_the_model_loads(files, monkeypatch, options, fragments):
    root, picture, ckpt = files
    monkeypatch.setattr(vlm_reroute.loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    options = [o.format(root=root) for o in options]
    result = runner.invoke(
        app, ["explain", "--model", str(ckpt["llava"]), "--image", str(picture), "--prompt", "?", *options]
    )
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize(
    "box, message",
    [("1,2,3", "--box '1,2,3'"), ("50,40,10,100", "x1 < x2"), ("a,b,c,d", "x1,y1,x2,y2")],
)
def test_bad_box_is_one_line(files, box, message):
    root, picture, ckpt = files
    result, text = explain("--model", ckpt["llava"], "--image", picture, "--prompt", "?", "--box", box)
    assert result.exit_code == 1 and message in text and "Traceback" not in result.output


def test_box_outside_the_picture_and_bad_sample(files):
    root, picture, ckpt = files
    args = ["--model", ckpt["llava"], "--image", picture, "--prompt", "?", "--layers", "2", "--keep", "9"]
    result, text = explain(*args, "--box", "0,0,300,100", "--out", root / "x.png")
    assert result.exit_code == 1 and "0 ≤ x1 < x2 ≤ 200" in text and "Traceback" not in result.output
    result, text = explain(*args, "--sample", 3)
    assert result.exit_code == 1 and "--sample 3" in text


def test_unknown_layout_and_processor_are_refused(files, monkeypatch):
    root, picture, ckpt = files
    args = ["--image", picture, "--prompt", "?", "--layers", "2", "--keep", "9", "--out", root / "u.png"]
    original = LlavaAdapter.image_layouts

    def two_views(self, image_ids, kwargs):  # as a crop family would describe its images
        return [
            [
                ImageLayout(lay.sample, lay.image, lay.offset, lay.length, lay.span, (GridView(4, 8),) * 2)
                for lay in sample
            ]
            for sample in original(self, image_ids, kwargs)
        ]

    with monkeypatch.context() as patch:
        patch.setattr(LlavaAdapter, "image_layouts", two_views)
        result, text = explain("--model", ckpt["llava"], *args)
    assert result.exit_code == 1 and "single-grid layouts" in text and "Traceback" not in result.output
    other = root / "siglip"
    shutil.copytree(ckpt["llava"], other, dirs_exist_ok=True)
    config = json.loads((other / "processor_config.json").read_text())
    config["image_processor"]["image_processor_type"] = "SiglipImageProcessor"
    (other / "processor_config.json").write_text(json.dumps(config))
    result, text = explain("--model", other, *args)
    assert result.exit_code == 1 and "image processor SiglipImageProcessor" in text, text


def test_qwen2_vl_is_drawn_too(tmp_path):
    picture = tmp_path / "p.png"
    Image.new("RGB", (150, 200), (90, 90, 90)).save(picture)
    ckpt = save_tiny_checkpoint("qwen2_vl", tmp_path / "qwen2")
    args = ["--model", ckpt, "--image", picture, "--prompt", "?", "--layers", "3", "--keep", "10"]
    args += ["--prune", "--no-scores", "--dpi", 20, "--json", "--out", tmp_path / "q.png"]
    result, text = explain(*args)
    assert result.exit_code == 0, text
    (image,) = json.loads(result.output)["samples"][0]["images"]
    assert image["grid"] == [7, 5] and image["decisions"]["PDrop"] == [
        {"layer": 3, "kept": 10, "re-entered": 0, "deferred": 0, "removed": 25}
    ]
    assert Image.open(tmp_path / "q.png").size[0] > 50
