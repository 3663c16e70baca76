"""``vlm-reroute eval``: the grid through lmms-eval on a tiny model, resuming, and the table and chart."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from vlm_reroute.eval.grid import FIELDS, Cell, plan, primary_metric
from vlm_reroute.eval.report import csv_text, markdown, table_rows

RESULTS = [
    {"task": "pope", "method": "vanilla", "reroute": False, "tier": None, "metric": "pope_accuracy",
     "value": 0.80, "avg_visual_tokens": 576.0, "tflops": 3.8, "kv_bytes": 300, "prefill_ms":90.0, "n": 10},
    {"task": "pope", "method": "pdrop", "reroute": False, "tier": 64.0, "metric": "pope_accuracy",
     "value": 0.60, "avg_visual_tokens": 64.2, "tflops": 1.1, "kv_bytes": 100, "prefill_ms":40.0, "n": 10},
    {"task": "pope", "method": "pdrop", "reroute": True, "tier": 64.0, "metric": "pope_accuracy",
     "value": 0.72, "avg_visual_tokens": 63.8, "tflops": 1.1, "kv_bytes": 100, "prefill_ms":42.0, "n": 10},
    {"task": "mme", "method": "vanilla", "reroute": False, "tier": None, "metric": "mme_perception_score",
     "value": 1500.0, "avg_visual_tokens": 576.0, "tflops": 3.9, "kv_bytes": 310, "prefill_ms":95.0, "n": 10},
    {"task": "mme", "method": "pdrop", "reroute": True, "tier": 64.0, "metric": "mme_perception_score",
     "value": 1200.0, "avg_visual_tokens": 64.2, "tflops": 1.2, "kv_bytes": 110, "prefill_ms":45.0, "n": 10},
]  # fmt: skip


def test_plan_has_vanilla_then_every_combination():
    cells = plan(["pope", "gqa"], ["fastv", "pdrop"], (False, True), [192, 64])
    assert len(cells) == 2 * (1 + 2 * 2 * 2)
    assert cells[0] == Cell("pope", "vanilla", False, None)
    assert Cell("gqa", "pdrop", True, 64.0) in cells
    with pytest.raises(ValueError, match="allowed are none, fastv"):
        plan(["pope"], ["fastvv"], (False,), [64])


def test_primary_metric_prefers_the_paper_metric():
    results = {
        "alias": "x",
        "pope_precision,none": 0.5,
        "pope_accuracy,none": 0.75,
        "pope_accuracy_stderr,none": 0.1,
    }
    assert primary_metric("pope_adv", results) == ("pope_accuracy", 0.75)
    assert primary_metric("custom", {"score,none": 3.0}) == ("score", 3.0)


def test_table_scores_and_retention():
    header, rows = table_rows(RESULTS)
    by = {(r[0], r[1]): r for r in rows}
    assert rows[0][0] == "vanilla"
    # pope is a fraction (shown in %), mme is not
    assert by[("PDrop", 64.0)][2:4] == pytest.approx([60.0, 75.0])
    assert by[("PDrop + Reroute", 64.0)][2:6] == pytest.approx([72.0, 90.0, 1200.0, 80.0])
    assert by[("PDrop", 64.0)][4:6] == [None, None]  # no mme cell for PDrop prune
    assert by[("vanilla", None)][-2] == pytest.approx(576.0)
    text = markdown(RESULTS)
    assert "| PDrop + Reroute | 64 | 72.0 (90.0%) | 1200.0 (80.0%) | 64.0 | 1.1500 |" in text
    parsed = list(csv.reader(io.StringIO(csv_text(RESULTS))))
    assert parsed[0][:4] == header[:4] and len(parsed) == 1 + len(rows)


def _rec(task, method, reroute, tier, value):
    costs = {"avg_visual_tokens": 64.0, "tflops": 1.0, "kv_bytes": 1, "prefill_ms": 1.0, "n": 4}
    return {"task": task, "method": method, "reroute": reroute, "tier": tier, "metric": "refcoco_ACC@0.5",
            "value": value, **costs}  # fmt: skip


def test_average_ratio_is_the_mean_of_grounding_scores_over_vanilla():
    """The paper's summary column: mean over RefCOCO splits of score / vanilla; POPE does not count."""
    results = [
        *RESULTS[:3],  # pope (not a grounding task)
        _rec("refcoco_bbox_rec_qwen3_5_val", "vanilla", False, None, 0.5),
        _rec("refcoco_bbox_rec_qwen3_5_val", "pdrop", True, 64.0, 0.25),
        _rec("refcoco+_bbox_rec_qwen3_5_testA", "vanilla", False, None, 0.4),
        _rec("refcoco+_bbox_rec_qwen3_5_testA", "pdrop", True, 64.0, 0.4),
        _rec("refcocog_bbox_rec_qwen3_5_val", "vanilla", False, None, 0.0),  # vanilla 0: left out
        _rec("refcocog_bbox_rec_qwen3_5_val", "pdrop", True, 64.0, 0.1),
    ]
    header, rows = table_rows(results)
    assert header[-3:] == ["average ratio %", "avg_T", "TFLOPs"]
    by = {(r[0], r[1]): r for r in rows}
    assert by[("PDrop + Reroute", 64.0)][-3] == pytest.approx(75.0)  # (0.25/0.5 + 0.4/0.4) / 2
    assert by[("vanilla", None)][-3] == pytest.approx(100.0)
    assert by[("PDrop", 64.0)][-3] is None  # no grounding cell in that row
    text = markdown(results)
    assert "| avg ratio | avg_T | TFLOPs |" in text and "| 75.0% | 64.0 |" in text
    assert "avg ratio" not in markdown(RESULTS)  # no grounding task, no column


def test_presets_choose_each_family_s_variants():
    from vlm_reroute.eval.presets import describe, preset_tasks

    main = preset_tasks("paper-main", "internvl")
    assert main[0] == "pope" and len(main) == 9
    assert all(
        t.startswith(("refcoco_", "refcoco+_", "refcocog_")) and "_bbox_rec_internvl_" in t for t in main[1:]
    )
    assert preset_tasks("ablation", "qwen3_5") == [
        "gqa", "mmbench_en_dev", "refcoco_bbox_rec_qwen3_5_testA", "refcoco_bbox_rec_qwen3_5_testB"
    ]  # fmt: skip
    assert preset_tasks("paper-main", "smolvlm") == ["pope"]
    assert "smolvlm (SmolVLM) (VQA only: no documented grounding format): pope" in describe("paper-main")
    with pytest.raises(ValueError, match="allowed are paper-main, ablation"):
        preset_tasks("main", "llava")


def test_dry_run_lists_the_tasks_each_family_gets(tmp_path):
    from vlm_reroute.cli import app
    from vlm_reroute.eval.presets import preset_tasks
    from vlm_reroute.families import FAMILIES

    every = CliRunner().invoke(app, ["eval", "--preset", "paper-main", "--dry-run"])
    assert every.exit_code == 0, every.output
    for family in FAMILIES:
        line = next(x for x in every.output.splitlines() if x.strip().startswith(f"{family.name} ("))
        assert line.endswith(", ".join(preset_tasks("paper-main", family.name)))
    folder = tmp_path / "ckpt"  # a config.json alone decides the family: nothing is loaded
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5ForConditionalGeneration"]}))
    one = CliRunner().invoke(
        app, ["eval", "--model", str(folder), "--preset", "ablation", "--methods", "pdrop",
              "--tiers", "64,32", "--layers", "3,7", "--dry-run"],
    )  # fmt: skip
    assert one.exit_code == 0, one.output
    assert "family qwen3_5 (Qwen3.5)" in one.output and "refcoco_bbox_rec_qwen3_5_testB" in one.output
    assert "cells: 20" in one.output  # 4 tasks x (vanilla + 2 modes x 2 tiers)
    missing = CliRunner().invoke(
        app, ["eval", "--model", str(tmp_path / "nope"), "--preset", "ablation", "--dry-run"]
    )
    assert missing.exit_code == 1 and missing.output.strip() == (
        f"error: no model folder at '{tmp_path / 'nope'}' (a folder with config.json, or a Hub id)"
    )


# ---------------------------------------------------------------------------------------- end to end
pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from eval_helpers import shared_workspace

    return shared_workspace(tmp_path_factory)


def _eval(ws, out, *extra, tasks="tiny_pope"):
    from vlm_reroute.cli import app

    args = ["eval", "--model", str(ws["qwen2_vl"]), "--tasks", tasks, "--out", str(out),
            "--include-path", str(ws["tasks"]), "--methods", "pdrop", "--device", "cpu",
            "--batch-size", "2", "--max-new-tokens", "4", "--limit", "2", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_grid_runs_resumes_and_reports(ws, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    first = _eval(ws, out, "--tiers", "20")
    assert first.exit_code == 0, first.output
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["reroute"], r["tier"]) for r in rows] == [
        ("vanilla", False, None),
        ("pdrop", False, 20.0),
        ("pdrop", True, 20.0),
    ]
    for row in rows:
        assert tuple(row) == FIELDS
        assert row["task"] == "tiny_pope" and row["metric"] == "pope_accuracy" and row["n"] == 2
        assert row["tflops"] > 0 and row["kv_bytes"] > 0 and row["prefill_ms"] > 0
    vanilla, prune, reroute = rows
    assert abs(prune["avg_visual_tokens"] - 20) <= 0.5 and abs(reroute["avg_visual_tokens"] - 20) <= 0.5
    assert vanilla["avg_visual_tokens"] > 40 and vanilla["kv_bytes"] > prune["kv_bytes"]
    cell = json.loads((out / "cells" / "tiny_pope__pdrop__reroute__20.json").read_text())
    assert len(cell["samples"]) == 2 and cell["samples"][0]["cost"]["method"] == "PDrop + Reroute"
    assert "| PDrop + Reroute | 20 |" in (out / "table.md").read_text()
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resuming: finished cells are skipped (no model is even built), new cells run
    from vlm_reroute.eval import model as plugin

    built = []
    original = plugin.VlmReroute.__init__
    monkeypatch.setattr(
        plugin.VlmReroute, "__init__", lambda self, **kw: built.append(kw) or original(self, **kw)
    )
    again = _eval(ws, out, "--tiers", "20")
    assert again.exit_code == 0 and built == []
    # the test's task folder (local data) wins over the shipped RefCOCO tasks of the same name
    tasks = "tiny_pope,refcoco_bbox_rec_qwen2_vl_val"
    more = _eval(ws, out, "--tiers", "20,30", "--reroute", "on", tasks=tasks)
    assert more.exit_code == 0, more.output
    assert len(built) == 1
    rows = json.loads((out / "results.json").read_text())
    assert [(r["task"][:4], r["method"], r["tier"]) for r in rows[3:]] == [
        ("tiny", "pdrop", 30.0),
        ("refc", "vanilla", None),
        ("refc", "pdrop", 20.0),
        ("refc", "pdrop", 30.0),
    ]
    assert "Answers identical to vanilla's" in (out / "table.md").read_text()

    # another run's settings are refused, with one line
    clash = _eval(ws, out, "--tiers", "20", "--max-new-tokens", "5")
    assert clash.exit_code == 1 and "other settings (max_new_tokens)" in clash.output


def _cells(out) -> dict[str, dict[int, list]]:
    cells = {}
    for path in sorted((out / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        cells[path.stem] = {s["doc_id"]: s["resps"] for s in cell["samples"]}
    return cells


def test_two_processes_answer_as_one(ws, tmp_path):
    """--processes 2: lmms-eval's data parallelism (accelerate, a gloo group on CPU) gives every sample the
    answer one process gives it; rank 0 writes the merged cells and the table."""
    from vlm_reroute.cli import app

    def grid(out, processes):
        args = ["eval", "--model", str(ws["internvl"]), "--tasks", "refcoco_bbox_rec_internvl_val",
                "--out", str(out), "--include-path", str(ws["tasks"]), "--methods", "pdrop",
                "--reroute", "on", "--tiers", "20", "--layers", "1,3,5", "--device", "cpu",
                "--batch-size", "2", "--max-new-tokens", "4", "--limit", "5",
                "--processes", str(processes)]  # fmt: skip
        return CliRunner().invoke(app, args)

    one = grid(tmp_path / "one", 1)
    assert one.exit_code == 0, one.output
    two = grid(tmp_path / "two", 2)
    assert two.exit_code == 0, two.output
    single, parallel = _cells(tmp_path / "one"), _cells(tmp_path / "two")
    assert list(single) == list(parallel) and len(single) == 2
    for name in single:
        assert parallel[name] == single[name] and sorted(single[name]) == list(range(5))
    ranks = {
        s["cost"]["rank"]
        for p in (tmp_path / "two" / "cells").glob("*.json")
        for s in json.loads(p.read_text())["samples"]
    }
    assert ranks == {0, 1}
    rows = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [r["n"] for r in rows] == [5, 5] and (tmp_path / "two" / "table.md").exists()
