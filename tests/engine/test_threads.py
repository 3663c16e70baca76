"""Concurrent calls on one routed model give what serial calls give.

Each call keeps its own state (thread-local, see ``engine/calls.py``), so threads sharing one model
and one block neither see each other's decisions nor corrupt each other's caches.
"""

from __future__ import annotations

import threading

import torch
from conftest import model_for

from vlm_reroute import PDrop
from vlm_reroute.testing.models import tiny_inputs

LAYERS, KEEP = [1, 2, 4, 6], [64, 64, 32, 16]
THREADS, ROUNDS = 4, 1


def _decisions(trace) -> list[torch.Tensor]:
    return [d.selected[0].clone() for d in trace.decisions]


def test_concurrent_calls_equal_serial_calls():
    model = model_for("llava")
    prompts = [tiny_inputs(model, (5 + 4 * i,), seed=20 + i) for i in range(THREADS)]
    method = PDrop(layers=LAYERS, keep=KEEP, reroute=True)
    with method(model) as trace:
        serial = []
        for p in prompts:
            logits = model(**p).logits
            serial.append((logits, _decisions(trace), model.generate(**p, max_new_tokens=3, do_sample=False)))
        results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def work(i: int) -> None:
            try:
                start.wait()
                with torch.no_grad():
                    for r in range(ROUNDS):
                        logits = model(**prompts[i]).logits
                        tokens = model.generate(**prompts[i], max_new_tokens=3, do_sample=False)
                        results[(i, r)] = (logits, tokens)
            except BaseException as exc:  # reported below with the thread that raised
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last = _decisions(trace)
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]!r}"
    assert len(results) == THREADS * ROUNDS
    for (i, _), (logits, tokens) in results.items():
        torch.testing.assert_close(logits, serial[i][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(tokens, serial[i][2])
    # the trace holds one complete prefill: exactly the decisions of one of the prompts
    assert any(
        len(last) == len(s[1]) and all(torch.equal(a, b) for a, b in zip(last, s[1], strict=True))
        for s in serial
    )
    assert trace.prefills == 2 * THREADS + 2 * THREADS * ROUNDS
