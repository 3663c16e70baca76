"""The demo model's training losses: the answer (soft coordinate targets) and the per-patch
auxiliary objective, with the training-only head that reads it (:class:`AuxHead`, never shipped).

Why soft coordinates: a box coordinate is one of 101 tokens ``0.00`` … ``1.00``; a Gaussian target
(σ = ``coord_sigma`` bins) makes a near miss cost less than a far one. Why the auxiliary loss: each
visual token classifies the colour and shape under it and regresses its object's box, so every patch
of an object carries what the object is and where it ends (issue 17's second trial; docs/demo.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import COLOR_CLASSES, SHAPE_CLASSES
from .pointing import POINT_LAYERS
from .vocab import vqa_answer_ids


class AuxHead(torch.nn.Module):
    """Per visual token: colour class, shape class, object box (training only; not shipped)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, len(COLOR_CLASSES) + len(SHAPE_CLASSES) + 4)
        self.readout = torch.nn.Linear(width, 4)  # the box from the final state at "[" (pointing.py)
        # the box from each pointing layer's output at "[" (deep readouts, run 7 on)
        self.deep = torch.nn.ModuleList(torch.nn.Linear(width, 4) for _ in POINT_LAYERS)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.proj(feats)
        c, s = len(COLOR_CLASSES), len(SHAPE_CLASSES)
        return out[..., :c], out[..., c : c + s], torch.sigmoid(out[..., c + s :])


def answer_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coords: torch.Tensor,
    sigma: float,
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token loss on the answer; coordinate targets are spread over neighbouring coordinates.

    ``token_weight`` (one weight per vocabulary id, for the non-coordinate targets; ``nll_loss``'s
    class weight) scales the loss of chosen answer words; the sum is still divided by the number of
    scored tokens, so a weight of 1 everywhere is the plain loss. Why: a VQA answer is one
    informative word where a box is four coordinates, so with a third of the questions VQA gets
    about an eighth of the answer gradient (run 8's model answered every yes/no question "no";
    docs/demo.md, run 9).
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    scored = labels >= 0
    logp = F.log_softmax(logits[scored], dim=-1)
    target = labels[scored]
    is_coord = (target[:, None] == coords[None, :]).any(dim=1)
    loss = F.nll_loss(logp[~is_coord], target[~is_coord], weight=token_weight, reduction="sum")
    if is_coord.any():
        where = (target[is_coord][:, None] == coords[None, :]).float().argmax(dim=1)
        grid = torch.arange(len(coords), dtype=torch.float32)
        soft = torch.softmax(-((grid[None, :] - where[:, None].float()) ** 2) / (2 * sigma**2), dim=1)
        loss = loss - (soft * logp[is_coord][:, coords]).sum()
    return loss / max(1, int(scored.sum()))


def aux_loss(head: AuxHead, feats: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour and shape cross-entropy on every patch, L1 on the box of object patches."""
    with torch.autocast("cpu", enabled=False):  # a small head: keep its losses in float32
        color, shape, box = head(feats.float())
    loss = F.cross_entropy(color.flatten(0, 1), batch["patch_color"].flatten())
    loss = loss + F.cross_entropy(shape.flatten(0, 1), batch["patch_shape"].flatten())
    gold = batch["patch_box"]
    obj = ~torch.isnan(gold[..., 0])
    if obj.any():
        loss = loss + 5.0 * F.l1_loss(box[obj], gold[obj])
    return loss


def token_weights(vqa_weight: float, vocab_size: int) -> torch.Tensor | None:
    """Per vocabulary id, the answer loss's weight (:func:`answer_loss`): ``vqa_weight`` on the VQA
    answer words, 1 elsewhere; None when ``vqa_weight`` is 1 (the plain loss)."""
    if vqa_weight == 1.0:
        return None
    weight = torch.ones(vocab_size)
    weight[vqa_answer_ids()] = vqa_weight
    return weight
