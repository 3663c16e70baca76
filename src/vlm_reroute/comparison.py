"""Prune and reroute side by side: a method and its twin with the same tokens per layer.

``vlm-reroute explain --compare`` and the demo draw what each mode kept, deferred and re-entered at
the same decisions; for the pictures to compare like with like, both runs must carry the same
number of visual tokens through every layer (Reroute's claim: same schedule, same budget).
"""

from __future__ import annotations

from typing import Any


def twin_method(method: Any) -> Any:
    """The same schedule in the other mode (prune ↔ reroute).

    FastV + Reroute decides at several layers, which FastV's prune refuses; its prune twin with the
    same decisions is PDrop with FastV's equal counts, identical to FastV's single decision (each
    later decision keeps every candidate).
    """
    try:
        return method.replace(reroute=not method.reroute)
    except ValueError:
        from .methods import FastV, method_from_spec

        schedule = method.schedule() if isinstance(method, FastV) else None
        if schedule is None:  # not FastV, or FastV with a budget not yet solved into a schedule
            raise
        return method_from_spec(
            "pdrop", layers=schedule.layers, keep=schedule.keep, score_from=method.score_from,
            withdraw_at=method.withdraw_at,
        )  # fmt: skip


def prune_and_reroute(chosen: Any, compare: bool, model: Any, inputs: dict) -> list[tuple[str, Any]]:
    """``chosen`` and, with ``compare``, its twin: the same schedule in the other mode.

    A budget is solved per image at each call, as ``run`` does. The twin must keep the same tokens
    per layer, so with ``compare`` the budget is first solved into one fixed schedule for the
    prompt's images, which then need one visual token count.
    """
    if not compare:
        return [(chosen.name, chosen)]
    if chosen.schedule() is None:
        from .budget import ModelShape
        from .pipelines import visual_tokens_per_image

        counts = sorted({n for row in visual_tokens_per_image(model, inputs) for n in row})
        if len(counts) != 1:
            raise ValueError(
                f"--compare draws one schedule in both modes, and these images have {counts} visual "
                "tokens: give --layers with --keep fractions of each image's tokens (e.g. 0.5,0.25)"
            )
        schedule = chosen.resolve(ModelShape.from_config(model.config), counts[0])
        chosen = type(chosen).from_schedule(schedule, withdraw_at=schedule.withdraw_at)  # VTW stays
    twin = twin_method(chosen)
    label = twin.name if type(twin) is type(chosen) else type(chosen).label(twin.reroute)
    return [(chosen.name, chosen), (label, twin)]
