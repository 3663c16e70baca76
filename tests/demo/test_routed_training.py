"""Routed training (``--route-share``): the random schedules, the tokens they activate, and the
masked execution against an independent reference that compacts each stage instead."""

from __future__ import annotations

import pytest
import torch

from vlm_reroute.demo.data import Curriculum, collate, training_scenes
from vlm_reroute.demo.model import DemoShape, build_model, build_processor
from vlm_reroute.demo.routed_training import RoutedDecoder, RowRoute, active_tokens, draw_routes, routed_batch

TINY = DemoShape(vision_width=32, vision_layers=1, width=32, layers=12, heads=2)


def test_routes_are_seeded_balanced_and_well_formed():
    first = draw_routes(3, 10, 16, 0.5, 12, 196)
    assert first == draw_routes(3, 10, 16, 0.5, 12, 196) and first != draw_routes(3, 11, 16, 0.5, 12, 196)
    modes = [r.reroute for step in (10, 11) for r in draw_routes(3, step, 16, 0.5, 12, 196) if r is not None]
    assert len(modes) == 16 and sum(modes) == 8  # as many reroute rows as prune rows over two steps
    for step in range(50):
        for route in draw_routes(0, step, 8, 0.75, 12, 196):
            if route is None:
                continue
            assert 1 <= route.layers[0] <= 3 and route.layers[-1] < 12
            assert list(route.layers) == sorted(set(route.layers))
            assert all(4 <= b <= a <= 196 for a, b in zip((196, *route.keep), route.keep, strict=False))
    assert draw_routes(0, 0, 16, 0.0, 12, 196) == [None] * 16
    with pytest.raises(ValueError, match=r"route share 1\.5"):
        draw_routes(0, 0, 16, 1.5, 12, 196)


def test_active_tokens_follow_prune_and_reroute():
    visual = torch.zeros(3, 40, dtype=torch.bool)
    visual[:, 2:34] = True
    routes = [RowRoute(False, (2, 5, 8), (20, 12, 6)), RowRoute(True, (2, 5, 8), (20, 12, 6)), None]
    active = active_tokens(visual, routes, 12, torch.Generator().manual_seed(0))
    assert active[:, :, ~visual[0]].all() and active[:, 2].all() and active[:2].all()
    for row in (0, 1):
        counts = active[:, row, 2:34].sum(-1).tolist()
        assert counts == [32] * 2 + [20] * 3 + [12] * 3 + [6] * 4
    stages = [active[layer, 0, 2:34] for layer in (2, 5, 8)]
    assert all(bool((later <= earlier).all()) for earlier, later in zip(stages, stages[1:], strict=False))
    returned = 0  # reroute draws every stage from all visual tokens: deferred tokens come back
    for seed in range(5):
        again = active_tokens(visual, routes, 12, torch.Generator().manual_seed(seed))[:, 1, 2:34]
        returned += int((again[5] & ~again[2]).sum() + (again[8] & ~again[5]).sum())
    assert returned > 0


def _batch(processor, model):
    scenes = training_scenes(0, 2, 0, Curriculum(ramp_steps=1, ground_share=0.5), turns=2)
    return collate(scenes, processor, int(model.config.image_seq_length), point_vqa=True)


def _reference_logits(model, embeds, length, active_row):
    """Each layer run on the compacted positions active there (gathered, own positions and rotary
    angles kept, causal among them), the others' states carried over unchanged."""
    language = model.model.language_model
    hidden = embeds[:length][None].clone()
    for index, layer in enumerate(language.layers):
        where = active_row[index, :length].nonzero().squeeze(1)
        n = len(where)
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        angles = language.rotary_emb(hidden, where[None])
        out = layer(
            hidden[:, where], attention_mask=causal, position_ids=where[None], position_embeddings=angles
        )
        hidden = hidden.clone()
        hidden[:, where] = out[0] if isinstance(out, tuple) else out
    return model.lm_head(language.norm(hidden))[0]


def test_masked_stages_equal_compacted_stages_in_float64():
    torch.manual_seed(0)
    model = build_model(TINY, seed=1).double().eval()
    batch = _batch(build_processor(), model)
    visual = batch["input_ids"] == model.config.image_token_id
    routes = [RowRoute(False, (2, 6, 9), (100, 40, 10)), RowRoute(True, (1, 4, 8), (60, 60, 30))]
    active = active_tokens(visual, routes, 12, torch.Generator().manual_seed(4))
    caught = {}
    language = model.model.language_model
    handle = language.register_forward_pre_hook(
        lambda m, a, k: caught.update(embeds=k["inputs_embeds"]), with_kwargs=True
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), RoutedDecoder(list(language.layers), active):
        routed = model(**inputs, pixel_values=batch["pixel_values"].double()).logits
    handle.remove()
    with torch.no_grad():
        for row in (0, 1):
            length = int(batch["attention_mask"][row].sum())
            want = _reference_logits(model, caught["embeds"][row], length, active[:, row])
            text = ~visual[row, :length]
            torch.testing.assert_close(routed[row, :length][text], want[text], rtol=1e-9, atol=1e-9)
            plain = model(**{k: v[row : row + 1] for k, v in inputs.items()},
                          pixel_values=batch["pixel_values"][row : row + 1].double()).logits  # fmt: skip
            assert not torch.allclose(plain[0, :length][text], want[text])  # the routing changed the answer


def test_all_active_is_the_plain_forward_and_hooks_always_go():
    model = build_model(TINY, seed=2).eval()
    batch = _batch(build_processor(), model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    layers = list(model.model.language_model.layers)
    with torch.no_grad():
        plain = model(**inputs).logits
        with RoutedDecoder(layers, torch.ones(12, *batch["input_ids"].shape, dtype=torch.bool)):
            same = model(**inputs).logits
    assert torch.equal(plain, same)
    everything = torch.ones(12, 2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="boom"), RoutedDecoder(layers, everything):
        raise RuntimeError("boom")
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers)
    with pytest.raises(ValueError, match="5 layers, the decoder has 12"):
        RoutedDecoder(layers, torch.ones(5, 2, 3, dtype=torch.bool))


def test_routed_rows_leave_the_pointing_loss():
    model = build_model(TINY, seed=3)
    batch = _batch(build_processor(), model)
    layers = list(model.model.language_model.layers)
    context, same = routed_batch(0, 0, 0.0, batch, layers, int(model.config.image_token_id))
    assert same is batch and not isinstance(context, RoutedDecoder)
    context, routed = routed_batch(0, 0, 1.0, batch, layers, int(model.config.image_token_id))
    assert isinstance(context, RoutedDecoder) and len(batch["point_rows"]) > 0
    assert len(routed["point_rows"]) == 0 and routed["point_where"].shape[0] == 0
    assert torch.equal(routed["box_rows"], batch["box_rows"])  # the readouts keep every row
