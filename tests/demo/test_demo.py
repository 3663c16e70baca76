"""The demo's scenes, tokenizer, model folder and training loop (fast; no trained weights needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vlm_reroute.demo import FAMILIES, scenes
from vlm_reroute.demo.data import Curriculum, answer_of, collate, prompt_ids, training_scenes
from vlm_reroute.demo.draw import GRID, SIZE
from vlm_reroute.demo.model import DemoShape, build_model, build_processor, save
from vlm_reroute.demo.vocab import EOS_ID, answer_ids, box_text, build_tokenizer
from vlm_reroute.eval.parsers import parser_for

TINY = DemoShape(vision_width=32, vision_layers=1, width=32, layers=12, heads=2)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].tobytes() == b[k].tobytes() if k == "image" else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("kind", ["ground", "vqa"])
def test_scenes_are_deterministic_by_seed(kind):
    first, again, other = (scenes(6, seed=s, kind=kind) for s in (11, 11, 12))
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    assert not all(_same(a, b) for a, b in zip(first, other, strict=True))


def test_scene_fields_and_families_cycle():
    ground, vqa = scenes(9, seed=5, kind="ground"), scenes(8, seed=5, kind="vqa")
    assert [s["family"] for s in ground] == list(FAMILIES["ground"]) * 3
    assert [s["family"] for s in vqa] == list(FAMILIES["vqa"]) * 2
    for s in ground:
        assert set(s) == {"image", "prompt", "kind", "family", "box"}
        assert s["image"].size == (SIZE, SIZE) and s["image"].mode == "RGB"
    for s in vqa:
        assert set(s) == {"image", "prompt", "kind", "family", "answer"}
        assert isinstance(s["answer"], str) and " " not in s["answer"]


def test_boxes_lie_inside_the_image_and_span_several_patches():
    for s in scenes(60, seed=2, kind="ground"):
        x1, y1, x2, y2 = s["box"]
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
        assert min(x2 - x1, y2 - y1) >= 2 * SIZE // GRID  # the regime the demo is built for


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        scenes(1, seed=0, kind="caption")
    with pytest.raises(ValueError, match="n="):
        scenes(-1, seed=0, kind="vqa")


def test_a_generated_box_decodes_in_llava_format_and_parses():
    tokenizer = build_tokenizer()
    text = box_text((22.4, 0, 224, 112), SIZE, SIZE)
    assert text == "[0.10, 0.00, 1.00, 0.50]"
    ids = answer_ids(text)
    assert len(ids) == 10 and ids[-1] == EOS_ID
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert parser_for("llava")(decoded, SIZE, SIZE) == pytest.approx((0.1, 0.0, 1.0, 0.5))
    assert tokenizer.decode(answer_ids("yes"), skip_special_tokens=True) == "yes"
    words = tokenizer("What color is the smallest red shape?")["input_ids"]
    assert tokenizer.unk_token_id not in words


def test_training_prompts_are_the_processors_prompts():
    processor = build_processor()
    scene = scenes(1, seed=0, kind="ground")[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scene["prompt"]}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    from_processor = processor(images=scene["image"], text=text, return_tensors="pt")["input_ids"][0].tolist()
    assert prompt_ids(processor, scene["prompt"], GRID * GRID) == from_processor
    assert from_processor.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == GRID * GRID


def test_batches_are_a_function_of_seed_and_step():
    processor = build_processor()
    a = collate(training_scenes(3, 4, 0, Curriculum()), processor, GRID * GRID)
    b = collate(training_scenes(3, 4, 0, Curriculum()), processor, GRID * GRID)
    c = collate(training_scenes(4, 4, 0, Curriculum()), processor, GRID * GRID)
    assert all(torch.equal(a[k].nan_to_num(-1), b[k].nan_to_num(-1)) for k in a)
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    scored = a["labels"] >= 0
    assert scored.any(dim=1).all()  # every row has an answer to learn
    assert (a["patch_color"] > 0).any() and (a["patch_color"] == 0).any()


def test_multi_turn_batches_follow_the_chat_template_and_score_every_answer():
    """``turns=3``: each image gets up to two more questions, in LLaVA's multi-turn template, with
    every answer scored and no object's box asked twice (it would be a copy of an earlier answer)."""
    processor = build_processor()
    batch_scenes = training_scenes(7, 6, 0, Curriculum(), turns=3)
    batch = collate(batch_scenes, processor, GRID * GRID)
    tokenizer = processor.tokenizer
    assert sum(len(s.extra["turns"]) for s in batch_scenes) >= 6
    for b, scene in enumerate(batch_scenes):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scene.prompt}]}]
        answers = [answer_of(scene)] + [a for _, a, _, _ in scene.extra["turns"]]
        for k, answer in enumerate(answers):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            if k + 1 < len(answers):
                question = scene.extra["turns"][k][0]
                messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        templated = processor.apply_chat_template(messages, tokenize=False)
        row = batch["input_ids"][b][batch["attention_mask"][b] == 1].tolist()
        text = tokenizer.decode(row, skip_special_tokens=False).replace("<image>", "")
        squeeze = "".join  # decoding spaces word tokens differently from the template: compare without
        assert squeeze(text.split()) == squeeze(templated.replace("<image>", "").lower().split())
        scored = batch["labels"][b][batch["labels"][b] >= 0].tolist()
        assert scored == [t for a in answers for t in answer_ids(a)]
        boxes = [a for a in answers if a.startswith("[")]
        assert len(boxes) == len(set(boxes))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-tiny")
    save(build_model(TINY), folder, dtype=torch.float16)
    return folder


def test_saved_folder_loads_through_auto_classes_and_the_pipeline(saved_tiny):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    import vlm_reroute

    model = AutoModelForImageTextToText.from_pretrained(saved_tiny, local_files_only=True)
    processor = AutoProcessor.from_pretrained(saved_tiny, local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert AutoTokenizer.from_pretrained(saved_tiny).decode(answer_ids("[0.10, 0.20, 0.30, 0.40]")[:-1]) == (
        "[0.10, 0.20, 0.30, 0.40]"
    )
    scene = scenes(1, seed=1, kind="ground")[0]
    inputs = processor(images=scene["image"], text="USER: <image> hi ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == GRID * GRID
    pipe = vlm_reroute.pipeline(saved_tiny, method="pdrop+reroute", ratio=0.111, strict=True, dtype="float32")
    answer = pipe(scene["image"], scene["prompt"], max_new_tokens=3)
    assert answer.visual_tokens == [GRID * GRID]
    assert len(answer.decisions) == 4 and answer.avg_visual_tokens == pytest.approx(0.111 * 196, abs=0.6)


def test_training_resumes_exactly(tmp_path):
    from vlm_reroute.demo.train import TrainConfig, train

    def config(out, steps):
        return TrainConfig(
            out=str(out), steps=steps, batch_size=2, log_every=1, eval_ground=0, eval_vqa=0, threads=1,
            width=TINY.width, layers=TINY.layers, heads=TINY.heads, vision_width=TINY.vision_width,
            vision_layers=TINY.vision_layers, warmup=1, turns=3, point_weight=0.5, readout_weight=1.0,
            point_head=1, deep_weight=1.0, point_vqa=True, route_share=0.5,
        )  # fmt: skip

    straight = train(config(tmp_path / "a", 2))
    train(config(tmp_path / "b", 1))
    resumed = train(config(tmp_path / "b", 2))
    assert resumed.step == 2 and (tmp_path / "b" / "curve.png").exists()
    for (name, p), q in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    for (name, p), q in zip(
        straight.head.state_dict().items(), resumed.head.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name  # the auxiliary head, readout included, is resumed too
    lines = (tmp_path / "b" / "log.txt").read_text()
    assert lines.count("start:") == 2 and np.isfinite(straight.seconds)
    assert " point " in lines and " readout " in lines and " deep " in lines  # every loss term is logged
    # --init from a run folder: its model and auxiliary heads, a new optimizer at step 0
    from vlm_reroute.demo.train import start

    begun = start(dataclasses.replace(config(tmp_path / "c", 2), init=str(tmp_path / "a"), seed=5))
    assert begun.step == 0 and not begun.opt.state
    for p, q in zip(straight.model.state_dict().values(), begun.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(straight.head.state_dict().values(), begun.head.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="model shape"):
        start(dataclasses.replace(config(tmp_path / "d", 2), init=str(tmp_path / "a"), width=64))


def test_scenes_are_pinned_across_machines():
    """Prompts, boxes and answers come from string-seeded ``random.Random`` only, so they are the same on
    any machine; pixel sums also depend on Pillow's rasteriser and numpy's PCG64 (pinned here too)."""
    ground = scenes(3, seed=1, kind="ground")
    assert [(s["prompt"], s["box"]) for s in ground] == [
        ("Give the bounding box of the yellow circle.", (12, 48, 75, 89)),
        ("Give the bounding box of the purple square right of the diamond.", (125, 9, 177, 61)),
        ("Give the bounding box of the topmost blue shape.", (178, 24, 220, 69)),
    ]
    assert [(s["prompt"], s["answer"]) for s in scenes(4, seed=1, kind="vqa")] == [
        ("What color is the smallest shape?", "blue"),
        ("What shape is the smallest blue shape?", "diamond"),
        ("How many circles are there?", "0"),
        ("Is there a purple triangle?", "no"),
    ]
    assert [int(np.asarray(s["image"], dtype=np.int64).sum()) for s in ground[:2]] == [19698251, 18756157]


def test_export_writes_fp16_weights_and_processor_only(tmp_path):
    from safetensors import safe_open

    from vlm_reroute.demo.export import export

    training = tmp_path / "run"
    save(build_model(TINY), training / "model")
    (training / "model" / "step.txt").write_text("7\n")
    (training / "state.pt").write_bytes(b"optimizer state stays here")
    out = export(training, tmp_path / "shipped")
    names = sorted(p.name for p in out.iterdir())
    assert "state.pt" not in names and "model.safetensors" in names and "tokenizer.json" in names
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = f.keys()  # a safetensors handle is not iterable
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert '"step": 7' in (out / "training.json").read_text()
    with pytest.raises(SystemExit, match="no demo model"):
        export(tmp_path / "empty", tmp_path / "x")


def test_ground_share_sets_the_mix_of_questions():
    """``Curriculum.ground_share`` is the share of grounding questions, first turns and extra
    turns alike: 0 asks only VQA, 1 only grounding, and 0.5 about half (run 11's setting)."""

    def kinds(share: float) -> list[str]:
        batch = training_scenes(3, 40, 0, Curriculum(ramp_steps=1, ground_share=share), turns=4)
        extra = [
            "ground" if target is not None else "vqa" for s in batch for _, _, target, _ in s.extra["turns"]
        ]
        return [s.kind for s in batch] + extra

    assert set(kinds(0.0)) == {"vqa"} and set(kinds(1.0)) == {"ground"}
    half = kinds(0.5)
    assert 0.35 < half.count("ground") / len(half) < 0.65
    assert half != kinds(0.65)


def test_vqa_answers_point_at_what_they_are_about():
    """With ``point_vqa`` a VQA answer points from the position that predicts its word at the
    objects it is about: the colour asked is the colour under every pointed patch, a count is the
    number of pointed objects; grounding rows (and only they) keep their boxes for the readouts."""
    processor = build_processor()
    scenes_ = training_scenes(11, 12, 0, Curriculum(ramp_steps=1), turns=1)
    plain = collate(scenes_, processor, GRID * GRID)
    batch = collate(scenes_, processor, GRID * GRID, point_vqa=True)
    assert torch.equal(plain["box_rows"], batch["box_rows"])
    assert torch.equal(plain["point_rows"], plain["box_rows"])
    vqa = [b for b, s in enumerate(scenes_) if s.kind == "vqa" and s.about]
    assert vqa, "the batch has VQA questions about objects"
    rows = batch["point_rows"].tolist()
    for b in vqa:
        scene = scenes_[b]
        (query,) = [pos for row, pos in rows if row == b]
        assert batch["labels"][b, query] == -100 and batch["labels"][b, query + 1] >= 0  # predicts the word
        where = batch["point_where"][rows.index([b, query])]
        first = int((batch["input_ids"][b] == processor.image_token_id).nonzero()[0])
        under = torch.from_numpy(scene.labels.reshape(-1))[where[first : first + GRID * GRID]]
        assert set(under.tolist()) == set(scene.about)
        if scene.family == "color":
            assert {scene.objects[k].color for k in scene.about} == {scene.answer}
        if scene.family == "count":
            assert len(scene.about) == int(scene.answer)
    assert len(batch["point_rows"]) == len(batch["box_rows"]) + len(vqa)


def test_pointing_loss_reads_the_models_own_attention():
    """The pointing loss's attention rows equal the eager attention ``transformers`` computes."""
    from vlm_reroute.demo.pointing import AttentionCatcher, point_loss

    processor = build_processor()
    model = build_model(TINY, seed=3).eval()
    model.set_attn_implementation("eager")
    batch = collate(training_scenes(5, 3, 0, Curriculum(), turns=3), processor, GRID * GRID)
    rows, where = batch["point_rows"], batch["point_where"]
    assert len(rows) >= 3
    layer = model.model.language_model.layers[4]
    catcher = AttentionCatcher([layer])
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_attentions=True,
        )
    catcher.remove()
    probs = out.attentions[4][rows[:, 0], :, rows[:, 1]]  # (P, heads, S)
    mass = (probs * where[:, None, :]).sum(-1).max(dim=1).values
    expected = -torch.log(mass.clamp_min(1e-6)).mean()
    assert torch.allclose(point_loss(catcher, rows, where), expected, rtol=1e-4, atol=1e-5)
    fixed = -torch.log((probs[:, 1] * where).sum(-1).clamp_min(1e-6)).mean()  # head 1 asked to point
    assert torch.allclose(point_loss(catcher, rows, where, head=1), fixed, rtol=1e-4, atol=1e-5)
    assert where.any(dim=1).all() and not where[:, : int(rows[:, 1].min())].all()
