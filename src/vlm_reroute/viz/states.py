"""The state of every visual token at every decision, computed from a trace (vectorised).

States (exclusive):

* **kept**: selected at this decision and at the previous one (every selected token at the first);
* **re-entered**: selected now, deferred at the previous decision (reroute only);
* **deferred**: not selected now, under reroute (it skips the stage and competes again later);
* **removed**: not selected now, under prune (gone for good). A token removed at an earlier
  decision stays "removed" in every later panel.

A vision-side stage (DivPrune, VisionZip, Nüwa's stage 1) is the trace's decision at layer 0: the
tokens it leaves out never enter the language model, so they are "removed" in every panel under
reroute too (no later decision can bring them back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..adapters.layout import ImageLayout
from ..engine.trace import Trace
from .geometry import check_single_grid

STATES = ("kept", "re-entered", "deferred", "removed")
KEPT, REENTERED, DEFERRED, REMOVED = range(4)
#: the states a panel of each mode can show, in title order
MODE_STATES = {False: (KEPT, REMOVED), True: (KEPT, REENTERED, DEFERRED)}


def trace_reroute(trace: Trace, reroute: bool | None = None) -> bool:
    """Whether ``trace`` ran under reroute: ``reroute`` when given, else read from the method's
    repr recorded in ``trace.method`` (every method carries a ``reroute=`` setting)."""
    if reroute is not None:
        return bool(reroute)
    found = re.search(r"\breroute=(True|False)\b", trace.method)
    if found:
        return found.group(1) == "True"
    if any(r > 0 for d in trace.decisions for r in d.reentered):
        return True
    raise ValueError(
        f"cannot tell whether trace of {trace.method!r} ran under prune or reroute; pass reroute=True/False"
    )


def check_sample(trace: Trace, sample: int) -> None:
    if not trace.decisions:
        raise ValueError("the trace has no decisions: run a prefill with images inside `with method(model)`")
    samples = len(trace.visual_tokens)
    if not 0 <= sample < samples:
        raise ValueError(f"sample {sample}: the trace holds samples 0..{samples - 1}")


def selection(trace: Trace, sample: int = 0) -> torch.Tensor:
    """Bool ``(decisions, visual tokens)``: which tokens of ``sample`` each decision selected."""
    check_sample(trace, sample)
    n = trace.visual_tokens[sample]
    mask = torch.zeros(len(trace.decisions), n, dtype=torch.bool)
    for i, d in enumerate(trace.decisions):  # a loop over decisions, not tokens
        mask[i, d.selected[sample].long()] = True
    return mask


def entered(trace: Trace, sample: int = 0) -> torch.Tensor:
    """Bool ``(visual tokens,)``: the tokens that entered the language model — those a vision-side
    stage (the decision at layer 0) kept, or every token without one."""
    chosen = selection(trace, sample)
    if trace.decisions[0].layer == 0:
        return chosen[0]
    return torch.ones_like(chosen[0])


def token_states(trace: Trace, sample: int = 0, reroute: bool | None = None) -> torch.Tensor:
    """Long ``(decisions, visual tokens)``: the state index (see :data:`STATES`) of every token."""
    chosen = selection(trace, sample)
    before = torch.cat([torch.ones_like(chosen[:1]), chosen[:-1]])
    if trace_reroute(trace, reroute):
        waiting = torch.where(entered(trace, sample), DEFERRED, REMOVED)  # stage 1's leftovers are gone
        return torch.where(chosen, torch.where(before, KEPT, REENTERED), waiting)
    if bool((chosen & ~before).any()):
        raise ValueError(f"trace of {trace.method!r} has tokens that came back: it did not run under prune")
    return torch.where(chosen, KEPT, REMOVED)


def candidate_scores(trace: Trace, sample: int = 0, reroute: bool | None = None) -> torch.Tensor:
    """Float ``(decisions, visual tokens)``: each decision's scores, NaN where a token was no
    candidate (removed earlier, under prune)."""
    chosen = selection(trace, sample)
    scores = torch.stack([d.scores[sample].float() for d in trace.decisions])
    if trace_reroute(trace, reroute):
        candidates = torch.ones_like(chosen)
        candidates[1:] = entered(trace, sample)  # after a vision-side stage: what it let in
        return torch.where(candidates, scores, torch.nan)
    candidates = torch.cat([torch.ones_like(chosen[:1]), chosen[:-1]])
    return torch.where(candidates, scores, torch.nan)


def image_cells(values: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    """``(decisions, rows, cols)``: per-token ``values`` ``(decisions, visual tokens)`` of one image
    laid out on its grid."""
    check_single_grid(layout)
    rows, cols = layout.grid
    own = values[:, layout.offset : layout.offset + layout.length]
    cells = layout.token_cells()[:, 1]
    out = torch.empty_like(own)
    out[:, cells] = own
    return out.view(values.shape[0], rows, cols)


def state_counts(states: torch.Tensor) -> torch.Tensor:
    """Long ``(decisions, 4)``: how many tokens are in each state at each decision."""
    flat = states.reshape(states.shape[0], -1)
    return torch.nn.functional.one_hot(flat, len(STATES)).sum(dim=1)


@dataclass(frozen=True)
class ImageStates:
    """One image of one sample in one run: cells' states and scores at every decision.

    The states are the module docstring's (kept, re-entered, deferred under Reroute, arXiv
    2606.12412; kept, removed under prune). ``states``: long ``(decisions, rows, cols)``;
    ``scores``: float, the same shape, NaN where a cell was no candidate.
    """

    layers: tuple[int, ...]
    states: torch.Tensor  # long (decisions, rows, cols)
    scores: torch.Tensor  # float (decisions, rows, cols), NaN where no candidate
    reroute: bool

    def counts(self) -> torch.Tensor:
        return state_counts(self.states)

    def title(self, i: int) -> str:
        """Panel title of decision ``i``: the layer and the count of every state this mode shows."""
        counts = self.counts()[i].tolist()
        shown = MODE_STATES[self.reroute]
        if self.reroute and counts[REMOVED]:  # left out by a vision-side stage
            shown = (*shown, REMOVED)
        parts = " · ".join(f"{STATES[s]} {counts[s]}" for s in shown)
        return f"layer {self.layers[i]}\n{parts}"


def image_states(trace: Trace, sample: int, image: int, reroute: bool | None = None) -> ImageStates:
    """States and candidate scores of image ``image`` of ``sample``, on its grid."""
    check_sample(trace, sample)
    layouts = trace.layouts[sample]
    if not 0 <= image < len(layouts):
        raise ValueError(f"image {image}: sample {sample} holds images 0..{len(layouts) - 1}")
    reroute = trace_reroute(trace, reroute)
    layout = layouts[image]
    return ImageStates(
        layers=tuple(d.layer for d in trace.decisions),
        states=image_cells(token_states(trace, sample, reroute), layout),
        scores=image_cells(candidate_scores(trace, sample, reroute), layout),
        reroute=reroute,
    )
