"""Shared check for stage-1 methods on multi-view families (VisionZip, Nüwa)."""

from __future__ import annotations

from typing import Any

import torch


def generate_matches_forward(model: Any, inputs: dict, method: Any, new_tokens: int) -> Any:
    """Under ``method``: ``generate()``'s first token logits equal the routed forward's last-token
    logits, and stage 1 picks the same anchors in both (the families that encode before the prefill
    group the views by the prompt then). Returns ``generate()``'s output."""
    with method(model) as trace:
        forward = model(**inputs).logits[:, -1]
        anchors = [[r.anchors.tolist() for r in sample] for sample in trace.stage1]
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert [[r.anchors.tolist() for r in sample] for sample in trace.stage1] == anchors
    torch.testing.assert_close(out.logits[0], forward, rtol=1e-4, atol=1e-4)
    return out
