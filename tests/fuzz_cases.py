"""Running the differential fuzz's seeded random cases: the engine against ``fuzz_reference``.

Cases are drawn in ``fuzz_draw.py`` (``make_case``: a tiny model, a batch of prompts with images,
a schedule and a mode); the reference reads the model through ``fuzz_weights.py``. ``run_case``
runs the engine through the public API and compares it with the float64 reference.

Families: the three original ones (inputs built here) and every family of
``vlm_reroute.testing.families`` (inputs from the family's real image processor: 1-3 prompts with
1-2 images of random sizes and a random question). Each image's token count is read from the
input ids by the family's prompt structure (``image_token_counts``), not from an adapter.

Tolerances (the engine runs the fp32 model; the reference is float64):

* ``SCORE_TOL``: |engine score - reference score| for every visual token. Scores are attention
  probabilities in [0, 1].
* ``TIE_MARGIN = 2 * SCORE_TOL``: if both scores of two tokens are within ``SCORE_TOL`` of the
  reference, the engine can rank them the other way round only when their reference scores are
  less than ``2 * SCORE_TOL`` apart. A decision may differ from the reference's top-k only by
  such swaps; any other difference is a mismatch.
* ``LOGIT_TOL``: max |engine logit - reference logit| over a sample's defined positions, relative
  to max(1, max |reference logit|). A greedy token may differ only if the reference's top two
  logits are within twice that. ``HYBRID_LOGIT_TOL`` replaces it on a decoder with
  linear-attention layers (Qwen3.5): the float32 gated delta rule alone — the *unrouted* model
  against this reference — differs by up to 4.3e-4 (median 1.1e-5) over 120 cases (seeds 1-4), and
  routed cases show the same spread (max 2.5e-4 over 112).

Measured on 3,500 correct cases (docs/fuzz.md): worst score difference 8e-6, worst relative logit
difference 2e-5. The injected faults move scores by 3e-3 or more and logits by 1e-3 or more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from fuzz_draw import (
    LLAVA_IMAGE_SIZE,
    Case,
    family_inputs,
    family_token_counts,
    make_case,
    tokens_of,
)
from fuzz_reference import RouterTie, Schedule, routed_prefill
from fuzz_weights import Weights, capture_prompts

from vlm_reroute import FastV, PDrop, kv_lengths
from vlm_reroute.testing.families import (
    NEW_FAMILIES,
    tiny_family_model,
)
from vlm_reroute.testing.models import (
    IMAGE_TOKEN,
    PAD_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB,
    TextShape,
    tiny_model,
)

SCORE_TOL = 5e-5
TIE_MARGIN = 2 * SCORE_TOL
LOGIT_TOL = 1e-4
HYBRID_LOGIT_TOL = 1e-3


@dataclass
class Outcome:
    case: Case
    failures: list[str] = field(default_factory=list)
    logit_err: float = 0.0  # worst relative logit difference
    score_err: float = 0.0  # worst absolute score difference
    near_ties: int = 0  # decisions that differed from the reference only within TIE_MARGIN
    seconds: float = 0.0
    unchecked: str = ""  # why the reference could not decide the case (a MoE router near-tie)

    def __str__(self) -> str:
        status = "MISMATCH" if self.failures else f"unchecked ({self.unchecked})" if self.unchecked else "ok"
        head = (
            f"case {self.case.index} (seed {self.case.seed}) {status}: logit_err={self.logit_err:.2e} "
            f"score_err={self.score_err:.2e} near_ties={self.near_ties} [{self.seconds:.2f}s]\n  {self.case}"
        )
        return "\n".join([head, *("  - " + f for f in self.failures[:8])])


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _model(family: str, shape: tuple[int, int, int, int, int], attn: str, weight_seed: int, ties: bool):
    layers, hidden, heads, kv_heads, ffn = shape
    text = TextShape(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn)
    if family in NEW_FAMILIES:
        model = tiny_family_model(family, shape=text, attn_implementation=attn, seed=weight_seed)
    else:
        extra = {"image_size": LLAVA_IMAGE_SIZE} if family == "llava" else {}
        model = tiny_model(family, shape=text, attn_implementation=attn, seed=weight_seed, **extra)
    if ties:  # zero queries: attention logits are exactly 0, scores exactly uniform (in fp32 and fp64)
        inner = model.model
        decoder = inner.text_model if hasattr(inner, "text_model") else inner.language_model
        with torch.no_grad():
            for layer in decoder.layers:
                if not hasattr(layer, "self_attn"):  # a linear-attention layer: no query to zero
                    continue
                layer.self_attn.q_proj.weight.zero_()
                if layer.self_attn.q_proj.bias is not None:
                    layer.self_attn.q_proj.bias.zero_()
    return model


def build_inputs(model, case: Case) -> tuple[dict, list[list[int]]]:
    """Processor-shaped, left-padded inputs, and the token count of every image per sample."""
    if case.family in NEW_FAMILIES:
        inputs = family_inputs(case.family, case.prompts, case.seed, case.index)
        counts = family_token_counts(case.family, case.prompts, case.seed, case.index)
        return inputs, [list(row) for row in counts]
    gen = torch.Generator().manual_seed(case.seed * 7919 + case.index)
    rows, sizes, grids = [], [], []
    for spec in case.prompts:
        row: list[int] = []
        for i, n_text in enumerate(spec.texts):
            row += torch.randint(1, VOCAB - 8, (n_text,), generator=gen).tolist()
            if i < len(spec.grids):
                n = tokens_of(case.family, spec.grids[i])
                block = [IMAGE_TOKEN] * n
                row += block if case.family == "llava" else [VISION_START, *block, VISION_END]
        rows.append(row)
        sizes.append([tokens_of(case.family, g) for g in spec.grids])
        grids += spec.grids
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if case.family == "llava":
        inputs["pixel_values"] = torch.randn(len(grids), 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=gen)
        return inputs, sizes
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    inputs["pixel_values"] = torch.randn(sum(h * w for h, w in grids), patch_dim, generator=gen)
    inputs["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).to(torch.int)
    return inputs, sizes


def _method(case: Case):
    s = case.schedule
    if case.fastv:
        return FastV(layer=s.layers[0], keep=s.keep[0], score_from=s.score_from)
    return PDrop(layers=list(s.layers), keep=list(s.keep), reroute=s.reroute, score_from=s.score_from)


# ---------------------------------------------------------------------------------------------
# Running and comparing
# ---------------------------------------------------------------------------------------------
def check_decision(
    out: Outcome, i: int, b: int, rec, engine: torch.Tensor, vis_image, exact: bool = False
) -> bool:
    """Compare one engine decision with the reference's top-k; True if the engine's is usable.
    ``exact``: the scores are exact ties by construction, so no swap is float rounding."""
    tag = f"decision {i} (layer {rec.layer}) sample {b}"
    n = rec.candidates.numel()
    if engine.numel() and (engine.min() < 0 or engine.max() >= n or not bool((engine.diff() > 0).all())):
        out.failures.append(f"{tag}: selection is not sorted unique indices in 0..{n - 1}")
        return False
    counts = torch.bincount(vis_image[engine], minlength=len(rec.counts)).tolist()
    if counts != rec.counts:
        out.failures.append(f"{tag}: keeps {counts} per image, expected {rec.counts}")
        return False
    if torch.equal(engine, rec.selected):
        return True
    if not bool(rec.candidates[engine].all()):
        out.failures.append(f"{tag}: selected {int((~rec.candidates[engine]).sum())} non-candidates")
        return True
    ours, theirs = set(rec.selected.tolist()), set(engine.tolist())
    gap = 0.0
    for m in range(len(rec.counts)):
        only_ref = [t for t in ours - theirs if int(vis_image[t]) == m]
        only_eng = [t for t in theirs - ours if int(vis_image[t]) == m]
        if only_ref:
            gap = max(gap, float(rec.scores[only_ref].max() - rec.scores[only_eng].min()))
    margin = 0.0 if exact else TIE_MARGIN  # exact ties go to the earlier token, no rounding excuse
    if exact or gap > margin:
        out.failures.append(
            f"{tag}: {len(theirs - ours)} tokens differ from the reference top-k; score gap {gap:.3e} "
            f"vs tie margin {margin:.1e} (engine {sorted(theirs - ours)[:6]}, "
            f"reference {sorted(ours - theirs)[:6]})"
        )
    else:
        out.near_ties += 1
    return True


def logit_tolerance(weights) -> float:
    """``HYBRID_LOGIT_TOL`` for a decoder with linear-attention layers, else ``LOGIT_TOL``."""
    return HYBRID_LOGIT_TOL if any(layer.linear for layer in weights.layers) else LOGIT_TOL


def _compare_logits(out: Outcome, what: str, engine: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = max(1.0, float(ref.abs().max()))
    err = float((engine.double() - ref).abs().max()) / scale
    out.logit_err = max(out.logit_err, err)
    if not err <= tol:
        out.failures.append(f"{what}: logits differ by {err:.3e} x scale {scale:.1f} > {tol:.0e}")


def _run_model(model, inputs: dict, case: Case) -> tuple:
    """``(generate output, None)`` or ``(None, forward output)`` for the case's mode."""
    if case.mode == "forward":
        return None, model(**inputs)
    torch.manual_seed(case.seed + case.index)
    sampling = {"do_sample": True, "top_k": 20} if case.mode == "sample" else {"do_sample": False}
    gen = model.generate(
        **inputs,
        max_new_tokens=case.new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
        **sampling,
    )
    return gen, None


FULL = Schedule(layers=(1,), keep=(1.0,), reroute=False)  # keeps every token: the unrouted model


def run_case(case: Case, routed: bool = True) -> Outcome:
    """Run the engine on ``case`` and compare it with the float64 reference.

    ``routed=False`` runs the plain model against the reference with a keep-everything schedule:
    a check of the reference itself, independent of the engine.
    """
    start = time.perf_counter()
    out = Outcome(case)
    model = _model(case.family, case.shape, case.attn, case.weight_seed, case.ties)
    inputs, sizes = build_inputs(model, case)
    generating = case.mode != "forward"
    schedule = case.schedule if routed else FULL
    with torch.no_grad():
        prompts = capture_prompts(model, inputs, sizes, generate=generating)
        weights = Weights.of(model)
        try:
            if routed:
                with _method(case)(model) as trace:
                    gen, fwd = _run_model(model, inputs, case)
                decisions = trace.decisions
            else:
                (gen, fwd), decisions = _run_model(model, inputs, case), []
        except Exception as error:  # an engine that raises on a valid case is a finding too
            out.failures.append(f"engine raised {type(error).__name__}: {error}")
            out.seconds = time.perf_counter() - start
            return out
    if routed and [d.layer for d in decisions] != list(schedule.layers):
        out.failures.append(f"decision layers {[d.layer for d in decisions]} != {list(schedule.layers)}")
        out.seconds = time.perf_counter() - start
        return out
    try:
        _compare(out, case, routed, schedule, prompts, weights, decisions, gen, fwd, inputs)
    except RouterTie as tie:  # float rounding picks an expert: the rest of the case has no answer
        out.unchecked = str(tie)
    out.seconds = time.perf_counter() - start
    return out


def _compare(out, case, routed, schedule, prompts, weights, decisions, gen, fwd, inputs) -> None:
    generating = case.mode != "forward"
    tol = logit_tolerance(weights)
    cache_lengths = []
    for b, prompt in enumerate(prompts):
        engine_sel = [d.selected[b].cpu() for d in decisions] if routed else None
        run = routed_prefill(weights, prompt, schedule, follow=engine_sel)
        if routed and not _check_decisions(out, b, decisions, run, prompt, exact=case.ties):
            run = routed_prefill(weights, prompt, schedule)  # unusable decisions: the reference's own
        cache_lengths.append([None if c is None else prompt.padding + c for c in run.cache_lengths()])
        if generating:
            _check_generation(out, b, gen, inputs["input_ids"].shape[1], run, case.mode == "greedy", tol)
        else:
            rows = fwd.logits[b, prompt.padding :][run.defined]
            _compare_logits(out, f"sample {b} prefill", rows, run.logits[run.defined], tol)
    if not generating:
        expected = [None if None in col else max(col) for col in zip(*cache_lengths, strict=True)]
        got = kv_lengths(fwd.past_key_values)
        if got != expected:
            out.failures.append(f"KV cache lengths {got}, expected {expected}")


def _check_decisions(out: Outcome, b: int, decisions, run, prompt, exact: bool) -> bool:
    """Selections, scores and re-entry counts of sample ``b``; False if a selection is unusable."""
    vis_image = prompt.image[prompt.visual]
    usable, previous = True, None
    for i, (d, rec) in enumerate(zip(decisions, run.decisions, strict=True)):
        selected = d.selected[b].cpu()
        usable &= check_decision(out, i, b, rec, selected, vis_image, exact=exact)
        err = float((d.scores[b].double() - rec.scores).abs().max())
        out.score_err = max(out.score_err, err)
        if not err <= SCORE_TOL:
            out.failures.append(f"decision {i} sample {b}: scores differ by {err:.3e} > {SCORE_TOL:.0e}")
        back = 0 if previous is None else len(set(selected.tolist()) - set(previous.tolist()))
        if d.reentered[b] != back:
            out.failures.append(f"decision {i} sample {b}: reentered {d.reentered[b]}, selections say {back}")
        previous = selected
    return usable


def _check_generation(out: Outcome, b: int, gen, width: int, run, greedy: bool, tol: float) -> None:
    """Every step's logits, decoding the engine's own tokens; greedy tokens must be the argmax."""
    for step, step_logits in enumerate(gen.logits):
        ref = run.logits[-1] if step == 0 else run.decode(int(gen.sequences[b, width + step - 1]))
        _compare_logits(out, f"sample {b} step {step}", step_logits[b], ref, tol)
        token = int(gen.sequences[b, width + step])
        if greedy and token != int(ref.argmax()):
            top2 = ref.topk(2).values
            if float(top2[0] - top2[1]) / max(1.0, float(ref.abs().max())) > 2 * tol:
                out.failures.append(f"sample {b} step {step}: token {token}, reference {int(ref.argmax())}")


def run_cases(count: int, seed: int = 0, first: int = 0) -> list[Outcome]:
    return [run_case(make_case(i, seed)) for i in range(first, first + count)]


if __name__ == "__main__":  # python tests/fuzz_cases.py [count] [seed]
    import sys

    torch.set_num_threads(1)
    n, s = (int(a) for a in (sys.argv[1:] + ["40", "0"])[:2])
    t0 = time.perf_counter()
    results = run_cases(n, s)
    for r in results:
        if r.failures:
            print(r, "\n ", r.case.repro())
    bad = sum(bool(r.failures) for r in results)
    print(
        f"{n} cases, {bad} mismatches, {sum(bool(r.unchecked) for r in results)} unchecked (router ties), "
        f"{sum(r.near_ties for r in results)} near ties, "
        f"max logit err {max(r.logit_err for r in results):.2e}, "
        f"max score err {max(r.score_err for r in results):.2e}, {time.perf_counter() - t0:.1f}s"
    )
