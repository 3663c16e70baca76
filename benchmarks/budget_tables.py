"""Print the budget tables of docs/budgets.md (Markdown).

Usage: ``PYTHONPATH=src python benchmarks/budget_tables.py > /tmp/tables.md``
"""

from __future__ import annotations

from vlm_reroute.budget import (
    compute_budget,
    flops,
    known_models,
    kv_bytes_per_token,
    load_model_info,
    load_shape,
)
from vlm_reroute.budget.presets import PRESET_MODELS, TIERS, preset
from vlm_reroute.budget.published import published_methods
from vlm_reroute.budget.solver import published_schedule, tabulated_methods
from vlm_reroute.budget.stage1 import stage1_macs

# published-model key -> shipped shape whose depth it was run on
PUBLISHED_ON = {"llava-1.5": "llava-1.5-7b", "qwen2.5-vl-7b": "qwen2.5-vl-7b"}


def _fmt_keep(keep: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, keep)) + "]"


def sanity() -> list[str]:
    s = load_shape("llava-1.5-7b")
    vanilla = flops(s, 576, convention="pdrop", count_text=False)
    pdrop = flops(s, 576, 0, [8, 16, 24], [288, 144, 72], convention="pdrop", count_text=False)
    fastv35 = compute_budget(s, 576, 35, [3], [288]).flops_fastv_ratio
    fastv0 = compute_budget(s, 576, 0, [3], [288]).flops_fastv_ratio
    return [
        "| fact (LLaVA-1.5-7B) | computed |",
        "| --- | --- |",
        f"| vanilla prefill, PDrop convention, n = 576 image tokens | {vanilla / 1e12:.3f} T MACs |",
        f"| original PyramidDrop (layers 8/16/24, keep 288/144/72) | {pdrop / 1e12:.3f} T MACs |",
        f"| FastV K=3 R=50%, FastV convention, n = 576 + 35 text | {100 * fastv35:.1f}% of vanilla |",
        f"| FastV K=3 R=50%, FastV convention, n = 576 | {100 * fastv0:.1f}% of vanilla |",
    ]


def kv_table() -> list[str]:
    lines = [
        "| model | hub id | layers | KV heads × head_dim | dtype bytes | KV per token | 576 image tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in known_models():
        info = load_model_info(name)
        s = info.shape
        per = kv_bytes_per_token(s)
        lines.append(
            f"| {name} | {info.hub_id} | {s.num_layers} | {s.num_kv_heads} × {s.head_dim} | {s.dtype_bytes} "
            f"| {per / 1024:.0f} KiB | {576 * per / 2**20:.0f} MiB |"
        )
    return lines


def published_vs_solved() -> list[str]:
    lines = [
        "| model | tier | method | layers | published keep | published avg_T | solved keep | solved avg_T |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, model in PUBLISHED_ON.items():
        for tier in TIERS:
            for method in published_methods():
                for reroute in (False, True):
                    pub = published_schedule(key, tier, method, reroute)
                    sol = preset(model, tier, method, reroute)
                    assert pub.layers == sol.layers, (pub, sol)
                    lines.append(
                        f"| {model} | {tier} | {sol.name} | {list(sol.layers)} | {_fmt_keep(pub.keep)} "
                        f"| {pub.avg_t:.2f} | {_fmt_keep(sol.keep)} | {sol.avg_t:.2f} |"
                    )
    return lines


def solved_budgets() -> list[str]:
    lines = [
        "| model | tier | method | layers | keep | avg_T | PDrop FLOPs | exact FLOPs | KV (image) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in PRESET_MODELS:
        shape = load_shape(model)
        for tier in TIERS:
            for method in tabulated_methods():
                for reroute in (False, True):
                    sol = preset(model, tier, method, reroute)
                    b = sol.budget(shape, n_text=0)
                    pdrop = f"{b.flops_pdrop / 1e12:.3f} T ({100 * b.flops_pdrop_ratio:.1f}%)"
                    exact = f"{b.flops_exact / 1e12:.3f} T ({100 * b.flops_exact_ratio:.1f}%)"
                    lines.append(
                        f"| {model} | {tier} | {sol.name} | {list(sol.layers)} | {_fmt_keep(sol.keep)} "
                        f"| {sol.avg_t:.2f} | {pdrop} | {exact} | {b.kv_bytes / 2**20:.1f} MiB |"
                    )
    return lines


def nuwa_stage1() -> list[str]:
    lines = [
        "| model | tier | K₁ | low anchors | salience | similarity | aggregation | total | of decoder |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, family in (("llava-1.5-7b", "llava"), ("qwen2.5-vl-7b", "qwen2_5_vl")):
        shape = load_shape(model)
        for tier in TIERS:
            sol = preset(model, tier, "nuwa")
            cost = stage1_macs(shape, family, sol.n_visual, sol.entry)
            decoder = sol.budget(shape, n_text=0).flops_pdrop
            g = [f"{x / 1e9:.2f} G" for x in (cost.salience, cost.similarity, cost.aggregation, cost.total)]
            lines.append(
                f"| {model} | {tier} | {sol.entry} | {cost.low_anchors} | {' | '.join(g)} "
                f"| {100 * cost.total / decoder:.1f}% |"
            )
    return lines


def main() -> None:
    sections = [
        ("Sanity facts", sanity()),
        ("KV cache per token", kv_table()),
        ("Published vs solved schedules (576 visual tokens per image)", published_vs_solved()),
        ("Solved presets and their budgets (n = 576 image tokens, no text; MACs)", solved_budgets()),
        ("Nüwa's stage 1 on the vision side (one 576-token image; MACs)", nuwa_stage1()),
    ]
    for title, lines in sections:
        print(f"### {title}\n")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main()
