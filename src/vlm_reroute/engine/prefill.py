"""The state of one routed prefill, built from the call's inputs.

A prefill is normally the whole prompt. Inside ``generate()`` the first forward may carry more than
the prompt: assisted generation and prompt lookup append draft tokens, and ``use_cache=False``
re-runs prompt + generated tokens at every step. Those tokens after the prompt are text that goes
through every layer (exactly what decoding them against the routed cache computes); decisions are
made from the prompt alone (the scorer sees positions ``< prompt_length`` only, the scoring query
is the prompt's last token), and the stage masks kept for decoding cover the prompt only, so the
cache can later be cropped back to any number of accepted drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..adapters.base import ModelAdapter
from ..adapters.layout import ImageLayout
from .trace import Decision


@dataclass
class Prefill:
    """State of one routed prefill (rebuilt for every prompt with images, kept by its call)."""

    tokens: torch.Tensor  # (B, N) input ids (a stand-in marking image positions for inputs_embeds)
    visual: torch.Tensor  # (B, N) bool, image tokens of the prompt
    image_ids: torch.Tensor  # (B, N) long, -1 off images
    layouts: list[list[ImageLayout]]
    counts: list[torch.Tensor]  # per stage: (n_images,) keep counts
    valid: torch.Tensor  # (B, N + 1) bool: not padding (the extra slot is False)
    last: torch.Tensor  # (B,) index of each sample's last prompt token: the scoring query
    prompt_length: int  # positions >= prompt_length follow the prompt (drafts, generated tokens)
    reuse: list[torch.Tensor] | None = None  # per stage (B, prompt_length): decisions already made
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # full (cos, sin), (B, N, head_dim)
    position_ids: torch.Tensor | None = None
    cache: Cache | None = None
    buffer: torch.Tensor | None = None
    index: torch.Tensor | None = None  # current compact layout, None before the first decision
    present: torch.Tensor | None = None  # visual tokens selected at the last decision
    pool: torch.Tensor | None = None  # visual tokens a vision stage let in (None: all of them)
    stage1: list[list[Any]] = field(default_factory=list)  # the vision stage's records (trace)
    stage_kwargs: dict[str, Any] = field(default_factory=dict)
    key_masks: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first layer, (B, L))
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # decision layer -> scores
    decisions: list[Decision] = field(default_factory=list)  # committed to the trace on success
    selections: list[torch.Tensor] = field(default_factory=list)  # per stage (B, prompt_length)
    # rows the decoder would add after some layers (Qwen3-VL's DeepStack): layer -> (mask, rows)
    additions: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    recurrent_mask: torch.Tensor | None = None  # the stage's 2-D padding mask for linear-attention layers

    @property
    def n(self) -> int:
        return self.visual.shape[1]

    @property
    def extra(self) -> int:
        """Tokens after the prompt in this forward."""
        return self.n - self.prompt_length

    def rows(self) -> torch.Tensor:
        """``(B, 1)`` batch index for advanced indexing with a ``(B, L)`` layout."""
        return torch.arange(self.visual.shape[0], device=self.visual.device)[:, None]

    def prompt_key_masks(self) -> tuple[tuple[int, torch.Tensor], ...]:
        """Each stage's key mask over the prompt part of its compact layout (the tokens after the
        prompt are the last ``extra`` slots of every row: fillers are on the left)."""
        return tuple((first, mask[:, : mask.shape[1] - self.extra]) for first, mask in self.key_masks)


def mask2d(kwargs: dict) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)}: routing needs a 2-D (batch, length) mask"
        )
    return mask


def start_prefill(
    adapter: ModelAdapter,
    keep_counts: Any,
    tokens: torch.Tensor,
    visual: torch.Tensor,
    kwargs: dict,
    prompt_length: int,
    reuse: list[torch.Tensor] | None,
) -> Prefill:
    """The prefill of ``tokens`` whose first ``prompt_length`` positions are the prompt (``visual``
    marks image tokens of the prompt only)."""
    n = visual.shape[1]
    prompt = tokens[:, :prompt_length]
    kwargs = {**kwargs, "input_ids": prompt}  # layouts may read the prompt (Idefics3's tile rows)
    image_ids = nn.functional.pad(adapter.image_ids(prompt, kwargs), (0, n - prompt_length), value=-1)
    layouts = adapter.image_layouts(image_ids, kwargs)
    counts = keep_counts(torch.bincount(image_ids[visual]))
    mask = mask2d(kwargs)
    valid = mask.bool() if mask is not None else torch.ones_like(visual)
    positions = torch.arange(n, device=visual.device)
    in_prompt = valid & (positions < prompt_length)
    last = (in_prompt.long() * (positions + 1)).argmax(dim=1)
    if reuse is not None and (len(reuse) != len(counts) or reuse[0].shape != prompt.shape):
        reuse = None
    return Prefill(
        tokens=tokens,
        visual=visual,
        image_ids=image_ids,
        layouts=layouts,
        counts=counts,
        valid=nn.functional.pad(valid, (0, 1), value=False),
        last=last,
        prompt_length=prompt_length,
        reuse=reuse,
    )
