"""The scorer protocol: how a decision ranks its candidate visual tokens.

In the spirit of kvpress's ``ScorerPress.score``: the executor hands a scorer everything it may
read at a decision (the hidden states entering the scoring layer, the layer, the adapter, the
layout and the candidates) and takes back one score per token; it then keeps the top k per image
itself. A method owns its scorer; family knowledge (projections, norms, rotary) stays in adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..kinds import ScoreFrom

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..adapters.base import ModelAdapter
    from ..adapters.layout import ImageLayout


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer may read at one decision, in full-sequence coordinates ``(B, N, ...)``.

    ``hidden`` holds every token's latest state: kept tokens as they enter ``layer``, deferred
    tokens (reroute) with the state they carried. ``keys`` marks the tokens present at this
    decision (text and candidates, no padding); ``candidates`` the visual tokens competing.
    ``last`` is each sample's last non-padding position; ``rope`` the ``(cos, sin)`` of every
    token at its original position. ``state`` is what the scorer's optional ``prepare`` returned for
    this prefill (``None`` when it has none): see :class:`Scorer`.
    """

    adapter: ModelAdapter
    layer: nn.Module
    layer_idx: int
    decision: int
    hidden: torch.Tensor
    keys: torch.Tensor
    candidates: torch.Tensor
    visual: torch.Tensor
    image_ids: torch.Tensor
    valid: torch.Tensor
    last: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    input_ids: torch.Tensor
    layouts: list[list[ImageLayout]]
    state: Any = None


@runtime_checkable
class Scorer(Protocol):
    """Returns float scores ``(B, N)``; only the entries of ``ctx.candidates`` are read.

    ``score_from`` is :attr:`ScoreFrom.CURRENT` (called with the decision layer itself) or
    :attr:`ScoreFrom.PREVIOUS` (called with layer ``l - 1`` and its input, for a decision at ``l``:
    FastV's convention); a scorer written elsewhere may hold the plain string ``"current"`` or
    ``"previous"``, which the executor reads as the enum.

    Prompt-time state: a scorer may also define ``prepare(ctx) -> state``. The executor calls it once
    per prefill with the context of the embeddings entering layer 0 (``layer_idx == 0``,
    ``decision == -1``, every visual token a candidate) and hands the result to every decision of
    that prefill as ``ctx.state`` (SparseVLM's text raters, arXiv 2410.04417, are chosen there). It
    is not part of the protocol, so scorers without it stay scorers.
    """

    # read-only, so that frozen dataclasses (every shipped scorer) implement the protocol
    @property
    def score_from(self) -> ScoreFrom: ...

    def score(self, ctx: ScoringContext) -> torch.Tensor: ...


@runtime_checkable
class Selector(Protocol):
    """Chooses the kept set itself instead of scoring (DART, arXiv 2502.11494; DivPrune-like rules).

    ``select(ctx, counts)`` returns a bool ``(B, N)`` mask holding, for every image ``g``, exactly
    ``counts[g]`` of its tokens among ``ctx.candidates`` (``counts`` is ``(n_images,)``, images
    numbered as in ``ctx.image_ids``; a count may be 0), deterministically: the same sample chooses
    the same set alone or in any batch. The executor uses it instead of its own top-k in both
    modes (under reroute ``ctx.candidates`` is active ∪ deferred), checks the counts, and records
    ``1`` for a chosen token and ``0`` otherwise as the decision's scores in the trace (a set rule
    has no per-token score). When the prompt's last token (the scoring query) is visual it is taken
    out of the candidates and its image's count beforehand, and added back: it is never routed away.
    ``score_from`` and ``prepare`` mean what they mean for a :class:`Scorer`.
    """

    @property
    def score_from(self) -> ScoreFrom: ...

    def select(self, ctx: ScoringContext, counts: torch.Tensor) -> torch.Tensor: ...


def scores_from(scorer: Scorer | Selector) -> ScoreFrom:
    """``scorer.score_from`` as the enum (a scorer written elsewhere may hold the plain string); any
    other value is refused here rather than silently scored at the decision layer itself."""
    score_from = ScoreFrom.of(scorer.score_from)
    if score_from is None:
        raise ValueError(
            f"{type(scorer).__name__}(score_from={scorer.score_from!r}): allowed are 'current' and 'previous'"
        )
    return score_from
