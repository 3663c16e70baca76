"""Qwen3-VL (dense and MoE): q/k norms, interleaved MRoPE and DeepStack on top of the Qwen2-VL layout.

Images are laid out as in Qwen2-VL (one ``<|image_pad|>`` run per image, grid from
``image_grid_thw`` or, inside ``generate()``, from the MRoPE position ids), so this adapter extends
:class:`~.qwen2_vl.Qwen2VLAdapter`. What differs:

* **Scoring.** ``Qwen3VLTextAttention`` applies ``q_norm`` / ``k_norm`` (RMSNorm over each head)
  after the projections and before RoPE; the base adapter's projections apply them whenever the
  attention module has them. The rotary module interleaves the t/h/w frequencies
  (``recomposition_frequencies``) into one ``(cos, sin)`` per token, which the executor gathers
  per token like any 1-D RoPE: each token keeps its own original MRoPE position.
* **DeepStack** (arXiv 2406.04334): the vision tower returns extra feature levels, and the text
  model adds level ``i`` to the hidden states of the visual positions after decoder layer ``i``
  (``_deepstack_process``: a full-sequence boolean mask, rows in mask order). A routed stage runs
  on fewer tokens, so the adapter takes these inputs out of the decoder call and the executor adds
  them itself: after layer ``i``, every visual token that ran layer ``i`` gets its own row, and a
  deferred or removed token gets none (it skipped the layer, the injection is part of it). Under
  reroute, a token deferred across a DeepStack layer comes back without that level, exactly as it
  comes back without that layer's attention and MLP. Decisions at any layer are therefore allowed.
* The MoE variant's sparse MLP routes each token on its own (no capacity limit), so it does not
  depend on which other tokens are present: the same adapter serves it.
"""

from __future__ import annotations

from typing import Any

import torch

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    prompt_classes = model_classes

    @property
    def addition_layers(self) -> tuple[int, ...]:
        levels = getattr(self.config.vision_config, "deepstack_visual_indexes", None) or []
        return tuple(range(min(len(levels), len(self.layers))))

    def take_layer_additions(
        self, decoder_kwargs: dict[str, Any]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        embeds = decoder_kwargs.pop("deepstack_visual_embeds", None)
        mask = decoder_kwargs.pop("visual_pos_masks", None)
        if embeds is None or mask is None:
            return {}
        if len(embeds) > len(self.addition_layers):
            raise ValueError(
                f"{len(embeds)} DeepStack levels but the vision config lists "
                f"{len(self.addition_layers)} (deepstack_visual_indexes)"
            )
        n = int(mask.sum())
        for level in embeds:
            if level.shape[0] != n:
                raise ValueError(
                    f"a DeepStack level holds {level.shape[0]} rows for {n} visual positions: the image "
                    "features do not match the prompt's image tokens"
                )
        return {i: (mask.bool(), level) for i, level in enumerate(embeds)}
