"""Why re-entry costs accuracy on the demo model: what each stage holds, and what stale states cost.

On the shipped demo model (run 9), PDrop + Reroute grounds far below PDrop prune run on *the same*
schedule (same layers, same tokens per layer, same scorer), so the difference is re-entry alone
(docs/demo.md). This script measures two things on the benchmark's held-out grounding scenes:

* **coverage**: per decision of PDrop + Reroute and of PDrop prune on reroute's schedule, the share
  of the target object's patches and of all objects' patches in the stage, the tokens that
  re-entered (and how many lie on objects / on the target), the target patches that ran the
  previous stage and were deferred, and the mean score percentile of tokens that were deferred at
  the previous decision ("stale") against those that ran it ("fresh"). Accuracy is split by
  whether target patches re-entered.
* **stale**: the untouched model (every token runs every layer), except that at the input of layer
  ``dst`` a random fraction of each image's visual tokens carry their state from the input of layer
  ``src`` — what a token deferred at ``src`` carries when it re-enters at ``dst``, without any token
  being absent. If that alone cost as much as reroute loses, stale states would be the cause.

Patches are on an object when the scene generator's per-patch labels say so (≥ 30 % cover)::

    python benchmarks/demo_reentry.py --out docs/demo-results --name reentry-2026-12-03

Writes ``NAME.json`` (per-scene records) and ``NAME.txt`` (the tables printed).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STALE_CASES = ((1, 3), (1, 6), (3, 9), (1, 9))
STALE_FRACTIONS = (0.25, 0.5)


def decision_record(decision: Any, j: int, labels: np.ndarray, target: int, prev: np.ndarray | None) -> dict:
    """What sample ``j``'s stage holds at one decision (``prev``: the previous stage's tokens)."""
    sel = np.zeros(labels.size, dtype=bool)
    sel[decision.selected[j].numpy()] = True
    tgt, obj = labels == target, labels >= 0
    rec: dict[str, Any] = {"layer": decision.layer, "kept": int(sel.sum()), "selected": sel}
    rec.update(
        target=float((sel & tgt).sum() / max(tgt.sum(), 1)),
        objects=float((sel & obj).sum() / max(obj.sum(), 1)),
    )
    if prev is not None:
        back = sel & ~prev
        pct = decision.scores[j].numpy().argsort().argsort() / (labels.size - 1)
        rec.update(reentered=int(back.sum()), reentered_objects=int((back & obj).sum()))
        rec.update(reentered_target=int((back & tgt).sum()), deferred_target=int((prev & tgt & ~sel).sum()))
        rec.update(pct_stale=float(pct[~prev].mean()), pct_fresh=float(pct[prev].mean()))
    return rec


def coverage(pipe: Any, full: list[Any], method: Any, batch: int = 20) -> list[dict[str, Any]]:
    """Per scene: correct or not, and :func:`decision_record` of every decision."""
    from vlm_reroute.demo.evaluate import score

    rows = []
    for start in range(0, len(full), batch):
        chunk = [s.public() for s in full[start : start + batch]]
        with torch.no_grad():
            answers = pipe.batch([(s["image"], s["prompt"]) for s in chunk], method)
        trace = answers[0].trace  # the batch's trace: read it before the next batch replaces it
        for j, (pub, answer) in enumerate(zip(chunk, answers, strict=True)):
            scene, prev, decisions = full[start + j], None, []
            for d in trace.decisions:
                rec = decision_record(d, j, scene.labels.reshape(-1), scene.target, prev)
                prev = rec.pop("selected")
                decisions.append(rec)
            rows.append(
                {"family": scene.family, "correct": bool(score(pub, answer).correct), "decisions": decisions}
            )
    return rows


def coverage_table(name: str, rows: list[dict[str, Any]]) -> list[str]:
    """The per-decision means of one configuration."""
    lines = [f"{name}: Acc@0.5 {100 * np.mean([r['correct'] for r in rows]):.1f} % ({len(rows)} scenes)"]
    for k, first in enumerate(rows[0]["decisions"]):
        ds = [r["decisions"][k] for r in rows]
        share = {key: np.mean([d[key] for d in ds]) for key in ("target", "objects")}
        line = f"  layer {first['layer']:2d}, keep {first['kept']:3d}: target {share['target']:.3f}"
        line += f", objects {share['objects']:.3f}"
        if "reentered" in first:
            mean = {key: np.mean([d[key] for d in ds]) for key in first if key not in ("layer", "kept")}
            line += f"; re-entered {mean['reentered']:.1f} (on objects {mean['reentered_objects']:.1f}"
            line += f", on the target {mean['reentered_target']:.2f})"
            line += f"; target deferred {mean['deferred_target']:.2f}"
            line += f"; score percentile stale {mean['pct_stale']:.3f} / fresh {mean['pct_fresh']:.3f}"
        lines.append(line)
    return lines


def split_table(rr: list[dict[str, Any]], same: list[dict[str, Any]]) -> list[str]:
    """Accuracy of both configurations on the scenes where target patches did / did not re-enter."""
    lines = ["accuracy by whether target patches re-entered under reroute (reroute / prune on its schedule):"]
    for k in range(1, len(rr[0]["decisions"])):
        for label, test in (("none re-entered", lambda n: n == 0), ("some re-entered", lambda n: n > 0)):
            idx = [i for i, r in enumerate(rr) if test(r["decisions"][k]["reentered_target"])]
            if idx:
                a, b = (100 * np.mean([rows[i]["correct"] for i in idx]) for rows in (rr, same))
                layer = rr[0]["decisions"][k]["layer"]
                lines.append(f"  layer {layer:2d}, {label}: {len(idx):3d} scenes, {a:.1f} / {b:.1f}")
    return lines


def stale_hooks(model: Any, src: int, dst: int, frac: float) -> list[Any]:
    """Hooks that give a random ``frac`` of the visual tokens, at layer ``dst``'s input, their state at
    layer ``src``'s input (prefill only; decode steps of one token are left alone)."""
    layers, image_id, held = model.model.language_model.layers, model.config.image_token_id, {}

    def visual(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            held["visual"] = ids == image_id

    def hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def keep(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if hidden_of(args, kwargs).shape[1] > 1:
            held["src"] = hidden_of(args, kwargs).detach().clone()

    def swap(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        hidden = hidden_of(args, kwargs)
        if hidden.shape[1] == 1:
            return None
        vis = held["visual"]
        draw = torch.rand(vis.shape, generator=torch.Generator().manual_seed(int(vis.sum())))
        pick = vis & (draw < frac)
        hidden = hidden.clone()
        hidden[pick] = held["src"][pick]
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return [
        model.register_forward_pre_hook(visual, with_kwargs=True),
        layers[src].register_forward_pre_hook(keep, with_kwargs=True),
        layers[dst].register_forward_pre_hook(swap, with_kwargs=True),
    ]


def stale(model: Any, pipe: Any, ground: list[dict], accuracy_of: Callable[[Any], float]) -> list[str]:
    """Accuracy of the untouched model with stale states swapped in, for each case and fraction."""
    lines = [f"stale states, every token present: vanilla {100 * accuracy_of(None):.1f} %"]
    for src, dst in STALE_CASES:
        for frac in STALE_FRACTIONS:
            hooks = stale_hooks(model, src, dst, frac)
            try:
                acc = accuracy_of(None)
            finally:
                for h in hooks:
                    h.remove()
            lines.append(
                f"  {frac:.0%} of visual tokens carry layer {src}'s state into layer {dst}: {100 * acc:.1f} %"
            )
    return lines


def main() -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_reroute import PDrop, method_from_spec
    from vlm_reroute.demo import checkpoint_path
    from vlm_reroute.demo.benchmark import DEMO_SEED
    from vlm_reroute.demo.evaluate import accuracy, answer_scenes, demo_pipeline
    from vlm_reroute.demo.scenes import FAMILIES, scene_at

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(checkpoint_path()))
    parser.add_argument("--ratio", type=float, default=0.333)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="reentry")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    pipe = demo_pipeline(model, AutoProcessor.from_pretrained(args.model))
    families = FAMILIES["ground"]
    full = [scene_at(DEMO_SEED, "ground", i, families[i % len(families)]) for i in range(args.n)]
    rr = coverage(pipe, full, method_from_spec("pdrop", reroute=True, model=model, ratio=args.ratio))
    layers = [d["layer"] for d in rr[0]["decisions"]]
    keep = [d["kept"] for d in rr[0]["decisions"]]
    same = coverage(pipe, full, PDrop(layers=layers, keep=keep, reroute=False))
    lines = [f"{args.model}, ratio {args.ratio}, seed {DEMO_SEED}; torch {torch.__version__}"]
    lines += coverage_table("PDrop + Reroute", rr) + coverage_table(f"PDrop prune on {layers} {keep}", same)
    lines += split_table(rr, same)
    ground = [s.public() for s in full]
    with torch.no_grad():
        lines += stale(model, pipe, ground, lambda m: accuracy(answer_scenes(pipe, ground, m)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"reroute": rr, "prune_same_schedule": same}))
    (args.out / f"{args.name}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
