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
from ..scoring.selection import compact_index, top_k_per_image
from .cache import RoutedCache, Routing
from .masks import StageMasks
from .trace import Decision, Trace
from .vision import report_logical_length


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
    # decision layer -> (scores, selected), computed a layer early (score_from="previous")
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)  # committed to the trace on success
    selections: list[torch.Tensor] = field(default_factory=list)  # per stage (B, prompt_length)
    # rows the decoder would add after some layers (Qwen3-VL's DeepStack): layer -> (mask, rows)
    additions: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    recurrent_mask: torch.Tensor | None = None  # the stage's 2-D padding mask for linear-attention layers
    scorer_state: Any = None  # what the scorer's prepare() read from the embeddings entering layer 0

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

    # ---- the state's own operations: the full buffer, candidates, selection, trace records ----
    def full_view(self, hidden: torch.Tensor) -> torch.Tensor:
        """Write the current hidden states into the full buffer and return it ``(B, N + 1, D)``.

        Deferred (and removed) tokens keep their last state there; the extra slot absorbs the writes
        of batch fillers and is zeroed to stay finite."""
        if self.buffer is None:
            self.buffer = hidden.new_zeros(hidden.shape[0], self.n + 1, hidden.shape[2])
        if self.index is None:
            self.buffer[:, : self.n] = hidden
        else:
            self.buffer[self.rows(), self.index] = hidden
            self.buffer[:, self.n] = 0
        return self.buffer

    def candidates(self, reroute: bool) -> torch.Tensor:
        """Reroute: every visual token competes (every one a vision stage let in); prune: only those
        kept at the last decision."""
        if reroute or self.present is None:
            return self.visual if self.pool is None else self.pool
        return self.present

    def select(self, stage: int, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Top k per image; the scoring query (the prompt's last token) is never routed away: when it
        is visual it takes one of its image's slots at every decision."""
        rows = self.rows()[:, 0]
        query_visual = self.visual[rows, self.last]
        if bool(query_visual.any()):
            scores = scores.float().clone()
            scores[rows[query_visual], self.last[query_visual]] = float("inf")
        return top_k_per_image(scores, candidates, self.image_ids, self.counts[stage])

    def query_slot(
        self, stage: int, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a set selector: ``(forced, open, counts)``. The scoring query, when it is a visual
        candidate, is ``forced`` in; the selector chooses among the ``open`` candidates the ``counts``
        left per image (its image gives up one slot), as :meth:`select` does with an infinite score."""
        rows = self.rows()[:, 0]
        forced = torch.zeros_like(self.visual)
        forced[rows, self.last] = self.visual[rows, self.last] & candidates[rows, self.last]
        counts = self.counts[stage]
        if bool(forced.any()):
            counts = counts - torch.bincount(self.image_ids[forced], minlength=counts.numel())
        return forced, candidates & ~forced, counts

    def check_set(self, chosen: torch.Tensor, open_: torch.Tensor, counts: torch.Tensor, owner: str) -> None:
        """A selector's set must hold exactly ``counts`` tokens per image, among the open candidates."""
        got = torch.bincount(self.image_ids[chosen & (self.image_ids >= 0)], minlength=counts.numel())
        if bool((chosen & ~open_).any()) or not torch.equal(got, counts):
            raise RuntimeError(
                f"{owner}: the selector chose {got.tolist()} tokens per image (or non-candidates); "
                f"a selector must choose exactly {counts.tolist()} among ctx.candidates"
            )

    def record(self, layer: int, scores: torch.Tensor, selected: torch.Tensor) -> Decision:
        """The trace's record of a decision (one device-to-host copy, then split per sample)."""
        rank = (self.visual.cumsum(dim=1) - 1)[selected].cpu()
        picked = list(rank.split(selected.sum(dim=1).tolist()))
        per_sample = self.visual.sum(dim=1).tolist()
        score_rows = list(scores[self.visual].detach().float().cpu().split(per_sample))
        if self.present is None:
            reentered = [0] * selected.shape[0]
        else:
            reentered = (selected & ~self.present).sum(dim=1).tolist()
        return Decision(layer=layer, selected=picked, scores=score_rows, reentered=reentered)

    def add_rows(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Add row ``rank`` of ``additions[layer]`` to each token of its mask that ran the layer
        (Qwen3-VL's DeepStack: deferred and removed tokens get none)."""
        mask, rows = self.additions[layer]
        rank = mask.flatten().cumsum(0).view_as(mask) - 1
        if self.index is None:
            hit, ranks = mask, rank[mask]
        else:
            position = self.index.clamp(max=self.n - 1)
            hit = (self.index < self.n) & mask[self.rows(), position]
            ranks = rank[self.rows(), position][hit]
        hidden = hidden.clone()
        hidden[hit] = hidden[hit] + rows[ranks].to(hidden.device, hidden.dtype)
        return hidden

    def gather(
        self, first: int, full: torch.Tensor, selected: torch.Tensor, masks: StageMasks
    ) -> torch.Tensor:
        """Enter the stage of text + ``selected`` from layer ``first`` on: its compact layout (original
        order, left fillers), gathered RoPE and position ids, masks; returns its hidden states."""
        self.present = selected
        index, filled = compact_index(~self.visual | selected, filler=self.n)
        self.index = index
        rows, rope_index = self.rows(), index.clamp(max=self.n - 1)
        key_mask = filled & self.valid[rows, index]
        self.key_masks.append((first, key_mask))
        assert self.rope is not None  # captured by the executor at layer 0, before any stage
        cos, sin = self.rope
        self.stage_kwargs = {
            "attention_mask": masks.attention(key_mask, index.shape[1], self.cache, first, full.dtype),
            "position_embeddings": (cos[rows, rope_index], sin[rows, rope_index]),
        }
        if self.position_ids is not None:
            self.stage_kwargs["position_ids"] = self.position_ids[rows, rope_index]
        self.recurrent_mask = masks.padding(key_mask, full)
        return full[rows, index]

    def settle(self, cache: RoutedCache, method: str, length_layer: int) -> None:
        """A complete prefill: the routed cache learns its stage layouts; when the layer
        ``transformers`` reads the length from (``length_layer``) was shortened (stage 0, or a
        decision there), the cache reports the full length."""
        cache._vlm_routing = Routing(method, self.prompt_key_masks(), self.prompt_length)
        stages = [mask for first, mask in self.key_masks if first <= length_layer]
        if stages:
            report_logical_length(cache, self.n - stages[-1].shape[1])

    def write_trace(self, trace: Trace) -> None:
        """Show this prefill's decisions in ``trace`` (only a complete, deciding prefill does)."""
        trace.decisions = self.decisions
        trace.stage1 = self.stage1
        trace.visual_tokens = self.visual.sum(dim=1).tolist()
        trace.layouts = self.layouts
        trace.prefills += 1

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
