"""The decision step of a routed prefill, shared by every method.

At a decision layer the executor (``executor.py``) hands the prefill's state here: the scorer's
context is built from the prompt part of the state, the candidates are scored and the top k per
image selected (or a set selector, DART's, chooses exactly k per image itself), the decision is
recorded for the trace, and the new kept set is gathered once. The same holds for the other points
where the kept set changes: the vision-side stage 0 (``vision.py``) at layer 0, and VTW's terminal
stage at ``withdraw_at``. A scorer's prompt-time ``prepare`` runs here too, once per prefill.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..scoring.base import Scorer, ScoringContext, Selector
from .masks import StageMasks
from .plan import Plan
from .prefill import Prefill
from .vision import Reports, stage_zero


class Decider:
    """The decisions of one plan: scoring or set selection, trace records, the stage gathers.

    It holds only what every call shares (adapter, plan, stage masks, vision reports); each call's
    state is the :class:`~.prefill.Prefill` it is handed.
    """

    def __init__(self, adapter: ModelAdapter, plan: Plan, masks: StageMasks, reports: Reports | None) -> None:
        self.adapter, self.plan, self.masks, self.reports = adapter, plan, masks, reports
        self.decision_of = {layer: i for i, layer in enumerate(plan.layers)}
        scorer = plan.scorer
        # exactly one is set: a set rule (DART) chooses instead of top-k over scores
        self.selector: Selector | None = scorer if isinstance(scorer, Selector) else None
        self.scorer: Scorer | None = None if isinstance(scorer, Selector) else scorer

    def score(
        self,
        st: Prefill,
        i: int,
        decision: int,
        layer: nn.Module,
        full: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        """Scores ``(B, N)`` from the method's scorer at layer ``i`` for the decision at ``decision``.

        The scorer sees the prompt only (positions ``< prompt_length``): tokens after it (drafts,
        generated tokens) neither query nor serve as keys, so the decision is the prompt's own.
        """
        assert self.scorer is not None  # only called when the plan's rule is no Selector (choose)
        scores = self.scorer.score(self.context(st, i, decision, layer, full, candidates))
        return nn.functional.pad(scores, (0, st.n - st.prompt_length)) if st.prompt_length < st.n else scores

    def choose(
        self,
        st: Prefill,
        i: int,
        decision: int,
        layer: nn.Module,
        full: torch.Tensor,
        candidates: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, selected)`` of the decision at ``decision``, read at layer ``i``: the top k per
        image of the scorer's scores, or the set a :class:`Selector` chooses (its trace scores are 1
        for a chosen token, 0 otherwise). Either way the visual scoring query keeps its slot."""
        stage = self.decision_of[decision]
        selector = self.selector
        if selector is None:
            scores = self.score(st, i, decision, layer, full, candidates)
            return scores, st.select(stage, scores, candidates)
        forced, open_, counts = st.query_slot(stage, candidates)
        p = st.prompt_length
        ctx = self.context(st, i, decision, layer, full, candidates)
        chosen = selector.select(dataclasses.replace(ctx, candidates=open_[:, :p]), counts)
        chosen = nn.functional.pad(chosen, (0, st.n - p), value=False) if p < st.n else chosen
        st.check_set(chosen, open_, counts, self.plan.method)
        selected = chosen | forced
        return selected.float(), selected

    def withdraw(self, st: Prefill, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """VTW's terminal stage (arXiv 2405.05803): from layer ``i`` on no visual token runs, under
        prune and reroute alike (nothing is ranked); the trace shows it as a decision keeping none."""
        none = torch.zeros_like(st.visual)
        if st.reuse is None:
            st.decisions.append(st.record(i, none.float(), none))
        return st.gather(i, st.full_view(hidden), none, self.masks)

    def prepare(self, st: Prefill, layer: nn.Module, hidden: torch.Tensor) -> None:
        """Prompt-time state (SparseVLM's text raters, arXiv 2410.04417): the scorer's optional
        ``prepare`` reads the embeddings entering layer 0 once per prefill (not on a re-run that
        reuses recorded decisions); every decision's context carries its result as ``ctx.state``."""
        prepare = getattr(self.plan.scorer, "prepare", None)
        if prepare is None or st.reuse is not None:
            return
        candidates = st.candidates(self.plan.reroute)
        st.scorer_state = prepare(self.context(st, 0, -1, layer, st.full_view(hidden), candidates))

    def context(
        self,
        st: Prefill,
        i: int,
        decision: int,
        layer: nn.Module,
        full: torch.Tensor,
        candidates: torch.Tensor,
    ) -> ScoringContext:
        """What the scorer reads at layer ``i``: the prompt part of the prefill's state."""
        p = st.prompt_length
        keys = st.valid[:, :p] & (~st.visual[:, :p] | candidates[:, :p])
        assert st.rope is not None  # captured at layer 0, before any decision or prepare
        return ScoringContext(
            adapter=self.adapter,
            layer=layer,
            layer_idx=i,
            decision=decision,
            hidden=full if p == st.n else full[:, : p + 1],
            keys=keys,
            candidates=candidates[:, :p],
            visual=st.visual[:, :p],
            image_ids=st.image_ids[:, :p],
            valid=st.valid if p == st.n else nn.functional.pad(st.valid[:, :p], (0, 1), value=False),
            last=st.last,
            rope=(st.rope[0][:, :p], st.rope[1][:, :p]),
            input_ids=st.tokens[:, :p],
            layouts=st.layouts,
            state=st.scorer_state,
        )

    def decide(self, st: Prefill, i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The decision at layer ``i``: chosen now, a layer early (``pending``), or reused from the
        first prefill of the same ``generate()``; recorded, then gathered."""
        stage = self.decision_of[i]
        full = st.full_view(hidden)
        if st.reuse is not None:
            selected = nn.functional.pad(st.reuse[stage], (0, st.extra), value=False)
        else:
            chosen = st.pending.pop(i, None)
            if chosen is None:
                chosen = self.choose(st, i, i, layer, full, st.candidates(self.plan.reroute))
            scores, selected = chosen
            st.decisions.append(st.record(i, scores, selected))
        st.selections.append(selected[:, : st.prompt_length])
        return st.gather(i, full, selected, self.masks)

    def enter(self, st: Prefill, hidden: torch.Tensor) -> torch.Tensor:
        """Stage 0: from layer 0 on only text and the tokens the vision stage kept go through."""
        assert self.reports is not None  # the executor builds reports for every plan with a vision stage
        entry = stage_zero(self.reports, hidden, st.visual, st.image_ids, st.layouts, len(self.plan.layers))
        st.counts, st.stage1 = entry.counts, entry.records
        st.decisions.append(st.record(0, entry.scores, entry.kept))
        st.pool = entry.kept
        return st.gather(0, st.full_view(hidden), entry.kept, self.masks)
