"""Pointing and readout supervision for the demo model: the token that writes a box attends to the
box's object (pointing) and carries the box (readout).

Why: probes of the demo model (docs/demo.md, training record) showed that once the first corner of
a box is given, the model reads the rest of the box from the right object's patches (median error
3–5 coordinate bins), but it rarely finds the object a referring expression names: most greedy
boxes overlapped *no* object. Binding words to patches was the bottleneck, and the answer loss
alone teaches it slowly. This loss supervises that binding directly: at a few decoder layers, the
query at the answer's ``[`` (the position that predicts ``x1``) should put attention mass on the
target object's visual tokens. Only the **best head** of each layer is asked to (``-log max_h
mass_h``), so the other heads stay free. It is a training-only objective, like the per-patch
auxiliary loss; nothing of it is in the shipped model, and it does not look at any reduction.

Readout (``--readout-weight``): a probe of the pointed model (run 5, step 328) found the best head
of layers 3/5/7 putting 0.9 of its attention on the target on held-out scenes, yet a ridge probe of
the final hidden state at ``[`` missed the target box by 15–18 bins (median): the object was found
but its box did not reach the state the coordinate tokens are read from. :func:`readout_loss`
regresses the target box from that state (the final norm's output at ``[``) with a linear head,
which trains exactly that path.

Fixed heads (``--point-head``, from run 7 on): a probe of run 6 (step 600, 144 held-out scenes)
showed why the readout did not learn. With ``max_h``, *which* head points changed from scene to
scene (at layer 3 the argmax was spread over all six heads: 18/3/17/21/24/13 of 96); the best
head's output alone gave the box to 4–8 bins, the attention-weighted layer input to 2–3, but the
concatenation of all heads — what ``o_proj`` and every later layer see — only to 18–22 bins, no
better than the mean box (22–24): the box sat in a different subspace in every scene, mixed with
the boxes the other heads read from other objects. With ``point_head = h`` head ``h`` of every
pointing layer is the one asked to point, so the box arrives in one place; deep readouts
(:func:`readout_loss` on each pointing layer's output, ``AuxHead.deep``) ask ``o_proj`` to write it
into the residual stream linearly, where the coordinate tokens can read it.

What it means for the prune-vs-reroute comparison: a model that attends to the target makes
attention-ranked methods (FastV, PDrop, Nüwa's stage 2) keep the target more often, in both modes
alike, since prune and reroute share the ranking rule and the schedule.
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapters.base import rotate_half

#: decoder layers whose attention is supervised (of 12), early enough for the box tokens to use it
POINT_LAYERS = (3, 5, 7)


class AttentionCatcher:
    """Catches the input and the rotary tables of chosen attention modules during one forward."""

    def __init__(self, layers: list[Any]) -> None:
        # decoder layers and their attention modules are typed Any: their attributes
        # (``self_attn``, ``q_proj``, ``config``) are the Llama modelling code's, not nn.Module's
        self.caught: list[tuple[Any, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
        self.handles = [m.self_attn.register_forward_pre_hook(self._catch, with_kwargs=True) for m in layers]

    def _catch(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.caught.append((module, hidden, kwargs["position_embeddings"]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def point_loss(
    catcher: AttentionCatcher, rows: torch.Tensor, where: torch.Tensor, head: int = -1
) -> torch.Tensor:
    """Mean over caught layers and pointing rows of ``-log`` (attention mass on the target) of head
    ``head``, or (``head=-1``) of the best head of each row.

    ``rows`` ``(P, 2)``: (batch row, query position); ``where`` ``(P, S)`` bool: the target's visual
    tokens in that row. Keys are the positions ≤ the query (causal; rows are right-padded, so all
    of them are real tokens).
    """
    if rows.numel() == 0:
        return torch.zeros(())
    losses = []
    b, pos = rows[:, 0], rows[:, 1]
    for attn, hidden, (cos, sin) in catcher.caught:
        heads, dim = attn.config.num_attention_heads, attn.head_dim
        kv = attn.config.num_key_value_heads
        q = attn.q_proj(hidden[b, pos]).view(len(b), heads, dim)
        k = attn.k_proj(hidden[b]).view(len(b), -1, kv, dim)
        batch = hidden.shape[0]  # the tables may be shared by the batch (first dimension 1)
        c, s = cos.expand(batch, -1, -1)[b], sin.expand(batch, -1, -1)[b]  # (P, S, dim)
        q = q * c[torch.arange(len(b)), pos][:, None] + rotate_half(q) * s[torch.arange(len(b)), pos][:, None]
        k = k * c[:, :, None] + rotate_half(k) * s[:, :, None]
        k = k.repeat_interleave(heads // kv, dim=2)
        logits = torch.einsum("phd,pshd->phs", q.float(), k.float()) * attn.scaling
        causal = torch.arange(k.shape[1])[None, :] <= pos[:, None]
        logits = logits.masked_fill(~causal[:, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)
        mass = (probs * where[:, None, :].float()).sum(-1)  # (P, heads)
        chosen = mass.max(dim=1).values if head < 0 else mass[:, head]
        losses.append(-torch.log(chosen.clamp_min(1e-6)).mean())
    return torch.stack(losses).mean()


def readout_loss(
    readout: torch.nn.Module, normed: torch.Tensor, rows: torch.Tensor, boxes: torch.Tensor
) -> torch.Tensor:
    """L1 between the box a linear head reads from a state (the final normed state, or a pointing
    layer's output) at each pointing row's ``[`` and the target box (normalised), times 5 as the
    per-patch box loss."""
    if rows.numel() == 0:
        return torch.zeros(())
    with torch.autocast("cpu", enabled=False):
        got = torch.sigmoid(readout(normed[rows[:, 0], rows[:, 1]].float()))
    return 5.0 * torch.nn.functional.l1_loss(got, boxes)
