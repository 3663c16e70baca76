"""The text ``speed.py`` leaves behind: the target verdicts it prints and the Markdown tables of results.md.

Both read only the JSON-shaped results (not live reports), so they also summarise earlier runs
loaded from ``--out``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["disturbed", "markdown", "summarise"]


def summarise(results: dict[str, Any]) -> list[str]:
    """One line per target: met or MISSED, with the numbers."""
    lines = []
    for name in ("llava32", "qwen28"):
        if name in results:
            rows = {r["name"]: r for r in results[name]["rows"]}
            for label, r in rows.items():
                if label == "vanilla":
                    continue
                lines.append(
                    f"{name} {label}: {r['prefill_s'] * 1e3:.1f} ms "
                    f"(vanilla {rows['vanilla']['prefill_s'] * 1e3:.1f}), speedup {r['speedup']:.2f}x, "
                    f"ideal {r['ideal_speedup']:.2f}x, FLOPs {r['theoretical_speedup']:.2f}x, "
                    f"ideal/measured {r['ideal_fraction']:.3f}"
                )
            lines.append(f"{name}: disturbed repeats {disturbed(results[name]['rows'])}")
            if name == "llava32":
                frac = rows["PDrop + Reroute"]["ideal_fraction"]
                verdict = "met" if frac >= 0.95 else "MISSED"
                lines.append(
                    f"TARGET 1 (llava32 PDrop + Reroute ideal/measured >= 0.95): {frac:.3f} -> {verdict}"
                )
    if "memory" in results:
        worst = max(
            (c["peak_ratio_to_vanilla"], n) for n, c in results["memory"]["configs"].items() if n != "vanilla"
        )
        verdict = "met" if worst[0] <= 1.10 else "MISSED"
        lines.append(
            f"TARGET 3 (routed peak RSS <= 1.10 x vanilla): worst {worst[1]} {worst[0]:.3f} -> {verdict}"
        )
    if "small" in results:
        for family, data in results["small"].items():
            rows = {r["name"]: r for r in data["rows"]}
            rr, van = rows["PDrop + Reroute"], rows["vanilla"]
            verdict = "met" if rr["prefill_s"] < van["prefill_s"] else "MISSED"
            lines.append(
                f"TARGET 4 ({family} small: reroute faster than vanilla): {rr['prefill_s'] * 1e3:.2f} ms "
                f"vs {van['prefill_s'] * 1e3:.2f} ms ({rr['speedup']:.2f}x, "
                f"ideal {rr['ideal_speedup']:.2f}x) -> {verdict}"
            )
    return lines


def disturbed(rows: list[dict[str, Any]]) -> str:
    """How many repeats some other process visibly slowed (a run > 1.5× its configuration's median)."""
    runs = len(rows[0]["prefill_runs_s"])
    hit = {i for r in rows for i, t in enumerate(r["prefill_runs_s"]) if t > 1.5 * r["prefill_s"]}
    return f"{len(hit)} of {runs}"


def _decoder_section(name: str, data: dict[str, Any]) -> list[str]:
    """One decoder experiment: its setting in a sentence, then one row per configuration."""
    shape, inputs, env, st = data["model"]["shape"], data["inputs"], data["environment"], data["settings"]
    out = [
        f"### {name}: {data['model']['class']}, {shape['num_layers']} layers, "
        f"hidden {shape['hidden_size']}, {shape['num_heads']} heads / {shape['num_kv_heads']} KV heads, "
        f"FFN {shape['intermediate_size']}",
        "",
        f"{inputs['visual_tokens']} visual + {inputs['text_tokens']} text tokens, "
        f"batch {inputs['batch']}, {st['repeats']} repeats (interleaved) after {st['warmup']} warm-up, "
        f"decode over {st['decode_repeats']} repeats × {st['decode_tokens']} tokens; "
        f"1-min load when it started: {env['load_avg_1min']:.2f}; disturbed repeats (some run > 1.5× "
        f"its median): {disturbed(data['rows'])}. Time outside the decoder layers (vanilla): "
        f"{data['outside_decoder_s'] * 1e3:.1f} ms.",
        "",
        "| method | layers | keep / image | avg_T | prefill ms | speedup | ideal ms | ideal speedup "
        "| FLOPs speedup | ideal / measured | efficiency | decode ms/tok | KV tokens (= theory) | KV MiB "
        "| router ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    breakdown = data.get("router_breakdown", {})
    for r in data["rows"]:
        router = breakdown.get(r["name"], {}).get("router_ms", {}).get("hooks (all router work)")
        same = (
            "=" if r["kv_tokens"] == r["kv_tokens_theory"] and r["kv_bytes"] == r["kv_bytes_theory"] else "≠"
        )
        out.append(
            f"| {r['name']} | {r['layers'] or '—'} | {r['keep'] or '—'} | {r['avg_visual_tokens']:.1f} "
            f"| {r['prefill_s'] * 1e3:.1f} | {r['speedup']:.2f}× | {r['ideal_prefill_s'] * 1e3:.1f} "
            f"| {r['ideal_speedup']:.2f}× | {r['theoretical_speedup']:.2f}× | {r['ideal_fraction']:.3f} "
            f"| {r['efficiency']:.2f} | {r['decode_s_per_token'] * 1e3:.1f} | {r['kv_tokens']} ({same}) "
            f"| {r['kv_bytes'] / 2**20:.2f} | {'—' if router is None else f'{router:.1f}'} |"
        )
    return out + (_router_table(name, breakdown) if breakdown else [])


def _router_table(name: str, breakdown: dict[str, Any]) -> list[str]:
    """Milliseconds per router part (nested parts indented) for each configuration, side by side."""
    labels = list(next(iter(breakdown.values()))["router_ms"])
    out = [
        "",
        f"Router time per prefill ({name}, ms, median of the wrapped runs):",
        "",
        "| part | " + " | ".join(breakdown) + " |",
        "|---" * (len(breakdown) + 1) + "|",
    ]
    for label in labels:
        cells = " | ".join(f"{b['router_ms'][label]:.2f}" for b in breakdown.values())
        depth = (len(label) - len(label.lstrip())) // 2
        out.append(f"| {'↳ ' * depth}{label.strip()} | {cells} |")
    cells = " | ".join(f"{b['prefill_ms']:.1f}" for b in breakdown.values())
    out.append(f"| (whole routed prefill in these runs) | {cells} |")
    return out


def _memory_section(mem: dict[str, Any]) -> list[str]:
    """The fresh-process memory runs: peak RSS and prefill working set, each against vanilla's."""
    out = [
        f"### memory: {mem['model']}, {mem['images']} images, each configuration in a fresh process",
        "",
        "| configuration | schedule | peak RSS MiB | ratio to vanilla | prefill working set MiB "
        "(peak − RSS before) | ratio to vanilla |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in mem["configs"].items():
        out.append(
            f"| {name} | {c['method']} | {c['peak_rss_bytes'] / 2**20:.1f} "
            f"| {c['peak_ratio_to_vanilla']:.3f} | {c['increase_bytes'] / 2**20:.1f} "
            f"| {c['increase_ratio_to_vanilla']:.3f} |"
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    """The result tables of docs/benchmarks.md (Markdown), straight from the measurements."""
    out: list[str] = []
    for name in ("llava32", "qwen28", "small_llava", "small_qwen2_5_vl"):
        data = results.get(name) or results.get("small", {}).get(name.removeprefix("small_"))
        if data:
            out += [*_decoder_section(name, data), ""]
    if "memory" in results:
        out += [*_memory_section(results["memory"]), ""]
    return "\n".join(out)
