"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): a hybrid of Gated DeltaNet and full-attention layers.

Images, positions (interleaved MRoPE, ``rope_deltas``) and the grid are Qwen3-VL's, without
DeepStack. The decoder alternates linear-attention layers (``Qwen3_5GatedDeltaNet``: a causal
depthwise convolution and a gated delta-rule recurrence over the sequence, no query/key softmax,
no positions) with full-attention layers (``config.text_config.layer_types``; every fourth layer
in the released checkpoints). What routing means there (``docs/hybrid.md``):

* **Decisions are scored at full-attention layers** and refused elsewhere, with the list of the
  allowed layers: a linear-attention layer has no attention row to rank tokens by. The scoring
  layer is the decision layer itself (``score_from="current"``) or the one before it
  (``"previous"``). Scoring follows ``Qwen3_5Attention``: the ``q_proj`` output holds, per head, the
  query and an output gate (only the query half is scored), ``q_norm`` / ``k_norm`` (zero-centred
  RMSNorm) per head, then **partial** RoPE on the first ``head_dim · partial_rotary_factor`` dims.
* **A deferred or removed token skips the linear-attention layers of its stage too.** They run on
  the stage's tokens in sequence order, so their convolution window and recurrent state are built
  from exactly those tokens, as if the others were absent: the state a linear layer caches (a
  ``kernel``-wide convolution window and a ``k_head_dim × v_head_dim`` state per value head) is
  the one that sequence leaves. The padding mask those layers multiply into their input is the
  stage's own 2-D mask (it zeroes left padding and batch fillers).
* ``Cache.get_seq_length()`` answers for the first full-attention layer (``length_layer``). A
  decision there is allowed: the routed cache then reports the full prompt length to
  ``transformers`` (as after Nüwa's stage 0), while each layer keeps its real length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kinds import ScoreFrom
from .base import by_name
from .qwen2_vl import Qwen2VLAdapter


class Qwen3_5Adapter(Qwen2VLAdapter):
    model_classes = ("Qwen3_5ForConditionalGeneration",)
    prompt_classes = model_classes

    @property
    def layer_types(self) -> list[str]:
        return list(self.text_config.layer_types)

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    @property
    def length_layer(self) -> int:
        """Up to transformers 5.24 ``Cache.get_seq_length()`` skips linear-attention layers and answers
        for the first full-attention layer; from 5.25 linear-attention cache layers count their own
        tokens and layer 0 answers (read from the release's cache class, not from its version)."""
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        if callable(vars(LinearAttentionCacheLayerMixin).get("get_seq_length")):
            return 0
        return self.layer_types.index("full_attention")

    def check(self) -> None:
        kinds = set(self.layer_types)
        if not kinds <= {"full_attention", "linear_attention"} or "full_attention" not in kinds:
            raise ValueError(
                f"{type(self.model).__name__} has layer types {sorted(kinds)}; vlm-reroute routes "
                "'full_attention' and 'linear_attention' layers, with at least one full-attention layer"
            )

    def allowed_decision_layers(self, score_from: ScoreFrom = ScoreFrom.CURRENT) -> tuple[int, ...]:
        full = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
        if score_from == ScoreFrom.PREVIOUS:
            return tuple(i + 1 for i in full if 0 < i + 1 < len(self.layer_types))
        return tuple(i for i in full if i > 0)

    def check_plan(self, layers: tuple[int, ...], score_from: ScoreFrom) -> None:
        allowed = self.allowed_decision_layers(score_from)
        bad = [layer for layer in layers if layer not in allowed]
        if bad:
            ahead = score_from == ScoreFrom.PREVIOUS
            where = "layer before each decision" if ahead else "decision layer itself"
            raise ValueError(
                f"decision layers {bad}: on {type(self.model).__name__} a decision is scored at a "
                f"full-attention layer (the {where}; the others are linear attention), so the allowed "
                f"decision layers are {list(allowed)}"
            )

    # ---- scoring: gated queries, partial RoPE -------------------------------------------------
    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``cos.shape[-1]`` dims of each head in place; the rest pass through."""
        super().apply_rope(x[..., : cos.shape[-1]], cos, sin)  # rotates the view in place
        return x

    def _attention(self, layer: nn.Module) -> Any:
        """The layer's ``Qwen3_5Attention``, its projections and sizes read by name (``by_name``)."""
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ValueError("a linear-attention layer has no queries or keys to score with")
        return attn

    def project_queries(
        self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        attn = self._attention(layer)
        batch, n = hidden.shape[:2]
        both = attn.q_proj(by_name(layer).input_layernorm(hidden)).view(batch, n, -1, 2 * attn.head_dim)
        q = attn.q_norm(both[..., : attn.head_dim])  # per head: query, then the output gate
        return self.apply_rope(q, cos, sin).mul_(attn.scaling)

    def project_keys(
        self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        attn = self._attention(layer)
        batch, n = hidden.shape[:2]
        k = attn.k_norm(attn.k_proj(by_name(layer).input_layernorm(hidden)).view(batch, n, -1, attn.head_dim))
        return self.apply_rope(k, cos, sin)
