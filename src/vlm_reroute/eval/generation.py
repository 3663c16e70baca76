"""Pieces of the lmms-eval model's generation: stop strings, token counts, teacher forcing, and the
budget warnings lmms-eval would otherwise hide."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

from ..budget.solver import UnreachableTargetWarning


def log_warning(text: str) -> None:
    """lmms-eval's log (loguru: stdout under ``python -m lmms_eval``, else stderr)."""
    from loguru import logger

    logger.warning(text)


@contextmanager
def reported_clamps(report: Callable[[str], None], shown: set[str]) -> Iterator[None]:
    """Pass each distinct :class:`UnreachableTargetWarning` raised in the block to ``report``, once.

    Importing lmms-eval runs ``warnings.filterwarnings("ignore")`` (``lmms_eval/utils.py``), so the
    solver's warning that an unreachable budget was clamped (tier=64 on an 8-layer model runs at 72.9)
    would never be seen. The block records warnings whatever the global filters say; other warnings
    are re-issued afterwards, under the caller's filters, as if the block had not been there.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreachableTargetWarning)
        yield
    for item in caught:
        if issubclass(item.category, UnreachableTargetWarning):
            text = " ".join(str(item.message).split())
            if text not in shown:
                shown.add(text)
                with tqdm.external_write_mode(file=sys.stderr):  # on its own line, not after a progress bar
                    report(text)
        else:
            warnings.warn_explicit(
                item.message, item.category, item.filename, item.lineno, source=item.source
            )


class Force:
    """Logits processor that forces the given tokens, one per step (teacher forcing inside generate).

    It exists so that a ``loglikelihood`` request is scored through ``generate()`` with the same
    routing, cache and masks as an answer.
    """

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[min(self.step, len(self.tokens) - 1)]] = 0.0
        self.step += 1
        return forced


def truncate(text: str, until: list[str]) -> str:
    """The text before the first stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def count_generated(ids: torch.Tensor, pad: int | None, eos: int | Callable | None) -> int:
    """Generated tokens up to and including the first end-of-sequence (padding after it excluded)."""
    values = ids.tolist()
    stops = {eos} if isinstance(eos, int) else set()
    for i, v in enumerate(values):
        if v in stops:
            return i + 1
    while values and pad is not None and values[-1] == pad:
        values.pop()
    return len(values)
