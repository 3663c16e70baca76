"""Train the demo model on CPU: ``python -m vlm_reroute.demo.train --out DIR [--init FOLDER]``.

Seeded and resumable: every ``--save-minutes`` the model, the auxiliary head, the optimizer, the
step and the RNG states go to ``DIR/state.pt`` (written to a temporary file, then renamed) and the
model to ``DIR/model/`` (a ``save_pretrained`` folder with its processor). Started again with the
same ``--out``, training continues from there; ``--init`` starts from a saved folder such as the
shipped fp16 checkpoint (optimizer restarted). Batches are a pure function of (seed, step), so a
resumed run sees the data an uninterrupted one would. The log (``DIR/log.txt`` and stdout), the
record (``history.jsonl``) and the curve (``curve.png``) live beside the checkpoint.

Objective: the answer's tokens (box coordinates with Gaussian soft targets over neighbouring
coordinate tokens, so a near miss costs less than a far one), plus a per-patch auxiliary loss on the
projector output (colour, shape and box of the object under each visual token). Held-out greedy
accuracy is measured every ``--eval-minutes``, vanilla and under PDrop prune / reroute.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import curve
from .data import Curriculum, collate, training_scenes
from .losses import AuxHead, answer_loss, aux_loss, token_weights
from .model import DemoShape, build_model, build_processor, count_parameters, save
from .pointing import POINT_LAYERS, AttentionCatcher, point_loss, readout_loss
from .routed_training import routed_batch
from .trainer_eval import evaluate
from .vocab import coordinate_ids


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in the state, so a resume keeps its settings)."""

    out: str
    init: str | None = None
    seed: int = 0
    steps: int = 8000
    batch_size: int = 24
    lr: float = 1e-3
    min_lr_frac: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.05
    aux_weight: float = 0.5
    #: weight of the pointing loss (:mod:`.pointing`); 0 = off
    point_weight: float = 0.0
    #: weight of the box readout at each box answer's ``[`` (:func:`.pointing.readout_loss`); 0 = off
    readout_weight: float = 0.0
    #: the head of each pointing layer asked to point; -1 = the best head of each answer (runs 5–6)
    point_head: int = -1
    #: weight of the readouts from the pointing layers' outputs (``AuxHead.deep``); 0 = off
    deep_weight: float = 0.0
    #: VQA answers point too (at the object asked about, the objects counted; from run 8 on)
    point_vqa: bool = False
    #: loss weight of VQA answer words against the other answer tokens (run 9 on; 1 = plain loss)
    vqa_weight: float = 1.0
    #: share of grounding questions (first and extra turns; run 11: 0.5 for more VQA answers)
    ground_share: float = 0.65
    #: share of each batch's rows routed on a random schedule, half prune, half reroute (run 12 on)
    route_share: float = 0.0
    coord_sigma: float = 1.0
    ramp_steps: int = 1500
    #: questions per image (a multi-turn conversation); 1 = one question, as at test time
    turns: int = 1
    threads: int = 2
    #: bf16 autocast; None = on only where the CPU has bf16 instructions (see :func:`fast_bf16`)
    bf16: bool | None = None
    save_minutes: float = 10.0
    eval_minutes: float = 20.0
    eval_ground: int = 90
    eval_vqa: int = 60
    log_every: int = 10
    max_minutes: float | None = None
    width: int = 192
    layers: int = 12
    heads: int = 6
    vision_width: int = 192
    vision_layers: int = 4


def fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX).

    Why it matters: on a CPU with those instructions a training step took 1.3 s in bf16 autocast
    against 2.3 s in fp32 (batch 16, one thread); on an AVX2-only EPYC guest bf16 autocast took
    38 s per step against 2.6 s in fp32 (two threads), because every bf16 matmul is emulated.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac`` of the peak at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class Run:
    """The live objects of a run."""

    cfg: TrainConfig
    model: Any
    processor: Any
    head: AuxHead
    opt: torch.optim.Optimizer
    step: int = 0
    seconds: float = 0.0

    @property
    def bf16(self) -> bool:
        """bf16 autocast for this process: the setting, or :func:`fast_bf16` when it is None."""
        return fast_bf16() if self.cfg.bf16 is None else self.cfg.bf16

    @functools.cached_property
    def token_weight(self) -> torch.Tensor | None:
        """Per vocabulary id, the answer loss's weight (:func:`token_weights`; None = all 1)."""
        return token_weights(self.cfg.vqa_weight, self.model.config.text_config.vocab_size)


def _shape(cfg: TrainConfig) -> DemoShape:
    return DemoShape(cfg.vision_width, cfg.vision_layers, cfg.width, cfg.layers, cfg.heads)


def _param_groups(model: Any, head: AuxHead, decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, or embeddings (decay would pull the position
    codes, which carry where a token is, towards zero)."""
    named = [*model.named_parameters(), *head.named_parameters()]
    plain = [p for n, p in named if p.ndim < 2 or "embed" in n]
    decayed = [p for n, p in named if not (p.ndim < 2 or "embed" in n)]
    return [{"params": decayed, "weight_decay": decay}, {"params": plain, "weight_decay": 0.0}]


def start(cfg: TrainConfig) -> Run:
    """Resume from ``cfg.out/state.pt`` if it exists, else start from ``cfg.init`` or from scratch."""
    out = Path(cfg.out)
    state_path = out / "state.pt"
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if state is not None:  # the stored settings win, except the ones that only steer this process
        keep = {
            "out",
            "max_minutes",
            "threads",
            "save_minutes",
            "eval_minutes",
            "steps",
            "eval_ground",
            "eval_vqa",
        }
        keep |= {"log_every", "bf16"}  # bf16 is a property of the machine, not of the run
        cfg = TrainConfig(**{**state["cfg"], **{k: getattr(cfg, k) for k in keep}})
    torch.manual_seed(cfg.seed)
    init_state = _init_state(cfg) if state is None and cfg.init else None
    if state is None and cfg.init and init_state is None:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(cfg.init, dtype=torch.float32)
    else:
        model = build_model(_shape(cfg), seed=cfg.seed)
    head = AuxHead(model.config.text_config.hidden_size)
    if init_state is not None:  # another run's folder: its weights and auxiliary heads, new optimizer
        model.load_state_dict(init_state["model"])
        _load_head(head, init_state["head"])
    opt = torch.optim.AdamW(_param_groups(model, head, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    run = Run(cfg, model, build_processor(), head, opt)
    if state is not None:
        model.load_state_dict(state["model"])
        _load_head(head, state["head"])
        opt.load_state_dict(state["opt"])
        run.step, run.seconds = state["step"], state["seconds"]
        random.setstate(state["py_rng"])
        np.random.set_state(state["np_rng"])
        torch.set_rng_state(state["torch_rng"])
    return run


def _init_state(cfg: TrainConfig) -> dict[str, Any] | None:
    """The state of a training folder given as ``--init`` (None for a model folder).

    Why: starting a new run from another run's folder keeps the auxiliary heads (per-patch and box
    readouts) it trained, where a ``save_pretrained`` folder has the model only.
    """
    path = Path(str(cfg.init)) / "state.pt"
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    shape = ("width", "layers", "heads", "vision_width", "vision_layers")
    if any(state["cfg"][k] != getattr(cfg, k) for k in shape):
        got = {k: state["cfg"][k] for k in shape}
        raise ValueError(f"--init {cfg.init}: its model shape {got} differs from this run's; give the same")
    return state


def _load_head(head: AuxHead, stored: dict[str, torch.Tensor]) -> None:
    missing, unexpected = head.load_state_dict(stored, strict=False)
    older = ("readout.", "deep.")  # heads that states of earlier runs lack
    if unexpected or any(not k.startswith(older) for k in missing):
        raise RuntimeError(f"auxiliary head state does not fit: missing {missing}, unexpected {unexpected}")


def checkpoint(run: Run) -> None:
    """Write the state (atomically) and the ``model/`` folder."""
    out = Path(run.cfg.out)
    state = {
        "cfg": dataclasses.asdict(run.cfg),
        "model": run.model.state_dict(),
        "head": run.head.state_dict(),
        "opt": run.opt.state_dict(),
        "step": run.step,
        "seconds": run.seconds,
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, out / "state.pt.tmp")
    os.replace(out / "state.pt.tmp", out / "state.pt")
    tmp = save(run.model, out / "model.tmp")
    (tmp / "step.txt").write_text(f"{run.step}\n")
    if (out / "model").exists():
        os.replace(out / "model", out / "model.old")
    os.replace(tmp, out / "model")
    if (out / "model.old").exists():
        import shutil

        shutil.rmtree(out / "model.old")


def log(run: Run, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')} step {run.step} {run.seconds / 3600:.2f}h] {text}"
    print(line, flush=True)
    with open(Path(run.cfg.out) / "log.txt", "a") as f:
        f.write(line + "\n")


def train_step(run: Run, batch: dict[str, torch.Tensor], coords: torch.Tensor) -> dict[str, float]:
    """One optimizer step. Hooks catch what the training-only losses read: the projector output
    (auxiliary per-patch loss), the pointing layers' attention inputs and the final normed states
    (readout at ``[``); the last two only when their weight is set."""
    cfg, language = run.cfg, run.model.model.language_model
    image_id = int(run.model.config.image_token_id)
    routing, batch = routed_batch(cfg.seed, run.step, cfg.route_share, batch, list(language.layers), image_id)
    caught: dict[str, list[torch.Tensor]] = {"projector": [], "normed": []}
    handles = [
        run.model.model.multi_modal_projector.register_forward_hook(
            lambda m, i, o: caught["projector"].append(o)
        )
    ]
    if cfg.readout_weight:
        handles.append(language.norm.register_forward_hook(lambda m, i, o: caught["normed"].append(o)))
    pointed = [language.layers[i] for i in POINT_LAYERS if i < len(language.layers)]
    if cfg.deep_weight:
        caught["deep"] = []

        def layer_output(module: Any, args: Any, out: Any) -> None:
            caught["deep"].append(out[0] if isinstance(out, tuple) else out)

        handles += [layer.register_forward_hook(layer_output) for layer in pointed]
    catcher = AttentionCatcher(pointed if cfg.point_weight else [])
    weights = {
        "lm": 1.0,
        "aux": cfg.aux_weight,
        "point": cfg.point_weight,
        "readout": cfg.readout_weight,
        "deep": cfg.deep_weight,
    }
    try:  # enable_grad: a caller (e.g. a test harness) may have switched autograd off
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.bf16)
        with torch.enable_grad(), autocast, routing:
            out = run.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            )
            parts = {
                "lm": answer_loss(out.logits, batch["labels"], coords, cfg.coord_sigma, run.token_weight),
                "aux": aux_loss(run.head, caught["projector"][0], batch),
            }
            rows, boxes = batch["box_rows"], batch["point_box"]
            if catcher.caught:
                where = batch["point_where"]
                parts["point"] = point_loss(catcher, batch["point_rows"], where, cfg.point_head)
            if caught["normed"]:
                parts["readout"] = readout_loss(run.head.readout, caught["normed"][0], rows, boxes)
            if caught.get("deep"):
                heads = zip(run.head.deep, caught["deep"], strict=False)  # tiny models: fewer layers
                parts["deep"] = torch.stack([readout_loss(h, o, rows, boxes) for h, o in heads]).mean()
            loss = torch.stack([weights[k] * v.float() for k, v in parts.items()]).sum()
    finally:
        for handle in handles:
            handle.remove()
        catcher.remove()
    for group in run.opt.param_groups:
        group["lr"] = lr_at(cfg, run.step)
    run.opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in run.opt.param_groups for p in g["params"]], 1.0)
    run.opt.step()
    return {
        "loss": loss.item(),
        **{k: v.item() for k, v in parts.items()},
        "lr": run.opt.param_groups[0]["lr"],
    }


def train(cfg: TrainConfig) -> Run:
    """Run (or continue) training until ``cfg.steps`` or ``cfg.max_minutes`` of this process."""
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # float32 denormals make CPU matmuls many times slower
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    run = start(cfg)
    cfg = run.cfg
    sizes = count_parameters(run.model)
    log(run, f"start: {sum(sizes.values()) / 1e6:.2f} M parameters {sizes}; config {dataclasses.asdict(cfg)}")
    coords = torch.tensor(coordinate_ids())
    curriculum = Curriculum(ramp_steps=cfg.ramp_steps, ground_share=cfg.ground_share)
    num_image_tokens = int(run.model.config.image_seq_length)
    began = last_save = last_eval = last_log = time.monotonic()
    seconds0 = run.seconds
    window: list[dict[str, float]] = []
    while run.step < cfg.steps:
        batch = collate(
            training_scenes(run.step, cfg.batch_size, cfg.seed, curriculum, cfg.turns),
            run.processor,
            num_image_tokens,
            point_vqa=cfg.point_vqa,
        )
        run.model.train()
        window.append(train_step(run, batch, coords))
        run.step += 1
        now = time.monotonic()
        run.seconds = seconds0 + now - began
        if run.step % cfg.log_every == 0:
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            per, last_log = (now - last_log) / len(window), now
            log(run, " ".join(f"{k} {v:.4g}" for k, v in mean.items()) + f" | {per:.2f} s/step")
            curve.append(
                Path(cfg.out), {"type": "step", "step": run.step, "hours": run.seconds / 3600, **mean}
            )
            window = []
        done = run.step >= cfg.steps or (cfg.max_minutes is not None and now - began > 60 * cfg.max_minutes)
        if done or now - last_save > 60 * cfg.save_minutes:
            checkpoint(run)
            last_save = time.monotonic()
            log(run, "saved")
        if done or now - last_eval > 60 * cfg.eval_minutes:
            result = evaluate(run.model, run.processor, cfg.eval_ground, cfg.eval_vqa)
            log(run, "eval " + " ".join(f"{k} {100 * v:.1f}" for k, v in result.items()))
            curve.append(
                Path(cfg.out), {"type": "eval", "step": run.step, "hours": run.seconds / 3600, **result}
            )
            curve.plot(Path(cfg.out))
            last_eval = time.monotonic()
        if done:
            break
    return run


def parse(argv: list[str] | None = None) -> TrainConfig:
    """Command-line options: every :class:`TrainConfig` field as ``--name`` (``_`` → ``-``)."""
    parser = argparse.ArgumentParser(
        prog="python -m vlm_reroute.demo.train", description=__doc__.split("\n")[0]
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":
            parser.add_argument(flag, required=True, help="checkpoint folder (created, or resumed)")
        elif f.name in ("init", "max_minutes"):
            kind = str if f.name == "init" else float
            parser.add_argument(flag, type=kind, default=None)
        elif isinstance(f.default, bool) or f.name == "bf16":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    train(parse())
