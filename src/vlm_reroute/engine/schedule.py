"""Decision schedules: which layers decide, and how many visual tokens each stage keeps.

A schedule is checked twice: its own shape when a method is built (sorted layers, keep values
of the right type and range, non-increasing counts under prune), and against a model and an
image when it is applied (layers in range, counts within the image's token count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Keep = int | float


def _describe(method: str, field: str, value: object) -> str:
    return f"{method}({field}={value!r})"


def check_keep_value(method: str, keep: Keep) -> None:
    """One keep entry: an int ≥ 1 (tokens per image) or a float in (0, 1] (fraction of the image)."""
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise TypeError(
            f"{_describe(method, 'keep', keep)}: a keep entry is an int (tokens kept per image) "
            "or a float in (0, 1] (fraction of each image's visual tokens)"
        )
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{_describe(method, 'keep', keep)}: a token count must be ≥ 1")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"{_describe(method, 'keep', keep)}: a keep ratio must be in (0, 1]")


def check_schedule(method: str, layers: Sequence[int], keep: Sequence[Keep], reroute: bool) -> None:
    """Validate a schedule's own shape (no model needed)."""
    if len(layers) == 0:
        raise ValueError(
            f"{_describe(method, 'layers', list(layers))}: at least one decision layer is needed"
        )
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{_describe(method, 'layers', list(layers))}: decision layers are ints")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(
            f"{_describe(method, 'layers', list(layers))}: decision layers must be strictly increasing "
            "(sorted, no repeats)"
        )
    if len(keep) != len(layers):
        raise ValueError(
            f"{method}(layers={list(layers)!r}, keep={list(keep)!r}): one keep entry per decision layer "
            f"is needed ({len(layers)} layers, {len(keep)} keep entries)"
        )
    for k in keep:
        check_keep_value(method, k)
    if not reroute:
        same_kind = all(isinstance(k, int) for k in keep) or all(isinstance(k, float) for k in keep)
        if same_kind and any(b > a for a, b in zip(keep, keep[1:], strict=False)):
            raise ValueError(
                f"{_describe(method, 'keep', list(keep))} with reroute=False: pruned tokens cannot "
                "come back, so keep counts must not increase from stage to stage"
            )


def check_layers_for_model(method: str, layers: Sequence[int], num_layers: int, first: int) -> None:
    """Decision layers must lie in ``first .. num_layers - 1``.

    Layer 0 never decides: its cache is the one ``transformers`` reads the sequence length from,
    so it must hold every token (and with ``score_from="previous"`` there is no layer -1).
    """
    for layer in layers:
        if not first <= layer < num_layers:
            raise ValueError(
                f"{_describe(method, 'layers', list(layers))}: layer {layer} is out of range; this decoder "
                f"has {num_layers} layers, so decision layers must be in {first}..{num_layers - 1}"
            )


def resolve_keep(method: str, keep: Keep, n_tokens: int) -> int:
    """Tokens one image of ``n_tokens`` keeps: the int itself, or ``max(1, int(n * ratio))``."""
    if isinstance(keep, float):
        return max(1, int(n_tokens * keep))
    if keep > n_tokens:
        raise ValueError(
            f"{_describe(method, 'keep', keep)}: an image has only {n_tokens} visual tokens; "
            f"a count must be in 1..{n_tokens} (or give a ratio in (0, 1])"
        )
    return keep


@dataclass(frozen=True)
class Stage:
    """A decision layer and the keep entry that applies from it up to the next decision."""

    layer: int
    keep: Keep


def stage_counts(
    method: str, stages: Sequence[Stage], image_sizes: torch.Tensor, reroute: bool
) -> list[torch.Tensor]:
    """Per-stage keep counts for every image (``image_sizes``: tokens per image, 1-D).

    Under prune the resolved counts must not increase (a token cannot come back), checked here
    per image because int and ratio entries can only be compared once the image size is known.
    """
    counts = []
    for stage in stages:
        resolved = [resolve_keep(method, stage.keep, int(n)) for n in image_sizes.tolist()]
        counts.append(torch.tensor(resolved, dtype=torch.long, device=image_sizes.device))
    if not reroute:
        for i in range(1, len(counts)):
            bad = (counts[i] > counts[i - 1]).nonzero()
            if len(bad):
                j = int(bad[0])
                raise ValueError(
                    f"{method}(keep={[s.keep for s in stages]!r}) with reroute=False: for an image of "
                    f"{int(image_sizes[j])} tokens the counts {[int(c[j]) for c in counts]} increase; "
                    "under prune they must not increase from stage to stage"
                )
    return counts
