"""Offline demo: route a tiny random VLM of every supported family and show what happened.

For each family (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL; 8 decoder layers, 576 visual tokens) it runs
vanilla, FastV, FastV + Reroute, PDrop and PDrop + Reroute on the same prompt and prints the
decisions, how many deferred tokens re-entered, visual tokens per layer, and the KV cache held
after prefill against vanilla. Weights are random: the numbers show the mechanics, not quality.

    python examples/tiny_demo.py
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from vlm_reroute import FastV, PDrop, kv_bytes, kv_lengths, output_cache
from vlm_reroute.testing.models import FAMILIES, tiny_inputs, tiny_model

METHODS = {
    "FastV": FastV(layer=2, keep=64),
    "FastV + Reroute": PDrop(layers=[2, 4, 6], keep=[64, 64, 64], reroute=True),
    "PDrop": PDrop(layers=[1, 2, 4, 6], keep=[128, 64, 32, 16]),
    "PDrop + Reroute": PDrop(layers=[1, 2, 4, 6], keep=[64, 64, 32, 16], reroute=True),
}


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    for family in FAMILIES:
        model = tiny_model(family)
        inputs = tiny_inputs(model, (24,))
        layers = len(model.model.language_model.layers)
        with torch.no_grad():
            vanilla = model(**inputs)
            answer = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, -6:].tolist()
        base_kv = kv_bytes(output_cache(vanilla))
        table = Table(title=f"{type(model).__name__} (tiny, random weights)")
        for col in (
            "method",
            "decisions: layer → kept (re-entered)",
            "visual tokens per layer",
            "KV tokens per layer",
            "KV bytes vs vanilla",
            "greedy tokens",
        ):
            table.add_column(col)
        n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        table.add_row(
            "vanilla",
            "-",
            str([n_visual] * layers),
            str(kv_lengths(output_cache(vanilla))),
            "100%",
            str(answer),
        )
        for name, method in METHODS.items():
            with torch.no_grad(), method(model) as trace:
                out = model(**inputs)
                tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, -6:].tolist()
            decisions = ", ".join(f"{d.layer}→{d.kept[0]} ({d.reentered[0]})" for d in trace.decisions)
            table.add_row(
                name,
                decisions,
                str(trace.tokens_per_layer(layers)),
                str(kv_lengths(output_cache(out))),
                f"{kv_bytes(output_cache(out)) / base_kv:.0%}",
                str(tokens),
            )
        console.print(table)


if __name__ == "__main__":
    main()
