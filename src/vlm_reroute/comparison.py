"""Prune and reroute side by side: a method and its twin with the same tokens per layer.

``vlm-reroute explain --compare`` and the demo draw what each mode kept, deferred and re-entered at
the same decisions; for the pictures to compare like with like, both runs must carry the same
number of visual tokens through every layer (Reroute's claim: same schedule, same budget).

A composed method (``VisionZip() + PDrop(...)``, spec ``visionzip+pdrop``) is compared as a whole: its
stage 1 is the same in both runs (it does not depend on the mode), and its in-decoder method is
fixed to the solved counts and turned into its twin.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: the settings a schedule decides (``from_schedule`` sets them); every other setting is kept
_SCHEDULE_FIELDS = frozenset({"layer", "layers", "keep", "reroute", "target", "withdraw_at"})


def twin_method(method: Any) -> Any:
    """The same schedule in the other mode (prune ↔ reroute).

    FastV + Reroute decides at several layers, which FastV's prune refuses; its prune twin with the
    same decisions is PDrop with FastV's equal counts, identical to FastV's single decision (each
    later decision keeps every candidate). A composed method keeps its stage 1 and turns its
    in-decoder method (``then``) into that method's twin.
    """
    then = getattr(method, "then", None)
    if then is not None:
        twin = twin_method(then)
        return dataclasses.replace(method, then=twin, reroute=twin.reroute, withdraw_at=twin.withdraw_at)
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


def twin_label(chosen: Any, twin: Any) -> str:
    """The twin's label under the chosen method's name: FastV's PDrop twin still reads "FastV", and a
    composed method reads "VisionZip + FastV" whatever its in-decoder twin's class."""
    then = getattr(chosen, "then", None)
    if then is not None:
        return f"{type(chosen).display} + {twin_label(then, twin.then)}"
    return twin.name if type(twin) is type(chosen) else type(chosen).label(twin.reroute)


def fixed_method(method: Any, schedule: Any) -> Any:
    """``method`` running ``schedule`` (solved for one image size) with its other settings kept.

    A composed method keeps its stage 1 as given (the same tokens enter in both modes) and fixes its
    in-decoder method (``then``) to the schedule's decisions, which are counts of the entering tokens.
    Why not ``type(method).from_schedule`` alone: it builds a method from the schedule's fields, and
    would drop ``then`` (a stage-1 method would then decide with its pass-through scorer) and every
    setting a schedule does not carry (``score_from``, DART's pivots, SparseVLM's variant, ...).
    """
    from .budget.schedule import Schedule

    then = getattr(method, "then", None)
    if then is not None:
        inner = Schedule(
            schedule.layers, schedule.keep, schedule.reroute, owner=then.name, withdraw_at=method.withdraw_at
        )
        return dataclasses.replace(method, then=fixed_method(then, inner))
    settings: dict[str, Any] = {"withdraw_at": method.withdraw_at}  # VTW stays (stage 1 schedules lack it)
    if type(method).stage_zero:  # its entry and decisions are the schedule; a scorer is its only other one
        if getattr(method, "scorer", None) is not None:
            settings["scorer"] = method.scorer
    else:
        kept = (f.name for f in dataclasses.fields(method) if f.init and f.name not in _SCHEDULE_FIELDS)
        settings.update({name: getattr(method, name) for name in kept})
    return type(method).from_schedule(schedule, **settings)


def prune_and_reroute(chosen: Any, compare: bool, model: Any, inputs: dict) -> list[tuple[str, Any]]:
    """``chosen`` and, with ``compare``, its twin: the same schedule in the other mode.

    A budget is solved per image at each call, as ``run`` does. The twin must keep the same tokens
    per layer, so with ``compare`` the budget is first solved into one fixed schedule for the
    prompt's images, which then need one visual token count. It is solved on the method bound to
    the model (as the engine runs it): on a hybrid decoder the default layers move to layers that can
    score (``methods.base.fit_layers``), and the fixed twins must decide there too.
    """
    if not compare:
        return [(chosen.name, chosen)]
    if chosen.schedule() is None:
        from .adapters import adapter_for
        from .budget import ModelShape
        from .pipelines import visual_tokens_per_image

        counts = sorted({n for row in visual_tokens_per_image(model, inputs) for n in row})
        if len(counts) != 1:
            raise ValueError(
                f"--compare draws one schedule in both modes, and these images have {counts} visual "
                "tokens: give --layers with --keep fractions of each image's tokens (e.g. 0.5,0.25)"
            )
        bound = chosen.bind(adapter_for(model))
        chosen = fixed_method(bound, bound.resolve(ModelShape.from_config(model.config), counts[0]))
    twin = twin_method(chosen)
    return [(chosen.name, chosen), (twin_label(chosen, twin), twin)]
