"""The demo model's answer loss: soft coordinates and the VQA word weight (training only)."""

from __future__ import annotations

import torch

from vlm_reroute.demo.losses import answer_loss, token_weights
from vlm_reroute.demo.vocab import EOS_ID, answer_ids, coordinate_ids, vocabulary


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: a box answer and a VQA answer, after a two-token prompt each."""
    vocab = len(vocabulary())
    box, word = answer_ids("[0.10, 0.20, 0.30, 0.40]"), answer_ids("yes")
    length = 2 + len(box)
    labels = torch.full((2, length), -100)
    labels[0, 2:] = torch.tensor(box)
    labels[1, 2 : 2 + len(word)] = torch.tensor(word)
    logits = torch.randn(2, length, vocab, generator=torch.Generator().manual_seed(0))
    return logits, labels, torch.tensor(coordinate_ids())


def test_weight_one_is_the_plain_loss_and_a_weight_scales_only_the_vqa_word():
    logits, labels, coords = _case()
    plain = answer_loss(logits, labels, coords, 1.0)
    assert token_weights(1.0, logits.shape[-1]) is None
    ones = torch.ones(logits.shape[-1])
    assert torch.equal(answer_loss(logits, labels, coords, 1.0, ones), plain)
    weight = token_weights(3.0, logits.shape[-1])
    assert weight is not None and weight[answer_ids("yes")[0]] == 3.0 and weight[EOS_ID] == 1.0
    weighted = answer_loss(logits, labels, coords, 1.0, weight)
    # the "yes" target sits at row 1, predicted from position 1; scored tokens: 10 + 2
    word_nll = -torch.log_softmax(logits[1, 1], dim=-1)[answer_ids("yes")[0]]
    assert torch.allclose(weighted - plain, 2.0 * word_nll / 12, atol=1e-6)
