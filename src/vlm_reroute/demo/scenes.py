"""Grounding and VQA scenes for the demo model: layouts, referring expressions and questions.

``scenes(n, seed=, kind=)`` is the public, deterministic generator: scene ``i`` of a seed is drawn
from a ``random.Random`` keyed by the string ``"{kind}/{seed}/{i}"`` (string seeds go through
SHA-512, so the same on every machine and Python ≥ 3.2) and a numpy PCG64 generator seeded from
it. Layouts draw colours and shapes from a small palette per scene, so that distractors share the
target's colour or its shape and the answer depends on the combination, the relation or the
extreme. Training uses :func:`make_scene` with a curriculum (fewer objects, chosen families).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .draw import COLORS, SHAPES, SIZE, TEXTURES, Shape, patch_labels, render

KINDS = ("ground", "vqa")
GROUND_FAMILIES = ("attribute", "spatial", "superlative")
VQA_FAMILIES = ("color", "shape", "count", "yesno")
FAMILIES = {"ground": GROUND_FAMILIES, "vqa": VQA_FAMILIES}
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
#: superlative -> (what is compared: "area" or a centre axis 0 = x, 1 = y; which end wins: -1 or 1)
EXTREMES: dict[str, tuple[Literal["area"] | int, int]] = {
    "smallest": ("area", -1),
    "largest": ("area", 1),
    "leftmost": (0, -1),
    "rightmost": (0, 1),
    "topmost": (1, -1),
    "bottommost": (1, 1),
}
GROUND_PROMPT = "Give the bounding box of {}."
#: objects per scene in the public (benchmark) distribution
OBJECTS = (3, 6)
_SIZE_RATIO = 1.3  # the smallest / largest must beat the runner-up's area by this factor
_POS_MARGIN = 14.0  # pixels between an extreme's centre and the runner-up's


@dataclass
class Scene:
    """A drawn scene with its question, plus what training needs (objects, per-patch labels).

    Grounding scenes ask for the box of a referring expression (attribute, spatial relation or
    superlative, as in RefCOCO: Yu et al., arXiv 1608.00272), VQA scenes for a colour, shape,
    count or yes/no; :meth:`public` is what :func:`scenes` returns.
    """

    image: Any
    prompt: str
    kind: str
    family: str
    objects: list[Shape]
    labels: np.ndarray
    target: int | None = None
    answer: str | None = None
    #: the objects the answer is about (the target; the object asked about; the objects counted)
    about: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The dict :func:`scenes` returns (the issue's API)."""
        out: dict[str, Any] = {"image": self.image, "prompt": self.prompt, "kind": self.kind}
        out["family"] = self.family
        if self.kind == "ground":
            out["box"] = self.objects[self.target].box  # type: ignore[index]
        else:
            out["answer"] = self.answer
        return out


def scenes(n: int, *, seed: int, kind: str) -> list[dict[str, Any]]:
    """``n`` scenes of ``kind`` (``"ground"`` or ``"vqa"``), the same for the same ``seed`` anywhere.

    Families cycle (scene ``i`` has family ``i mod len(families)``), so every family is equally
    represented in any run of consecutive scenes, which the per-family confidence intervals need.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: allowed are {', '.join(KINDS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: give a count ≥ 0")
    families = FAMILIES[kind]
    return [scene_at(seed, kind, i, families[i % len(families)]).public() for i in range(n)]


def scene_at(seed: int, kind: str, i: int, family: str, objects: tuple[int, int] = OBJECTS) -> Scene:
    """Scene ``i`` of ``seed`` with ``family``, drawn from its own keyed generator."""
    rng = random.Random(f"{kind}/{seed}/{i}")
    return make_scene(rng, kind, family, objects)


def make_scene(rng: random.Random, kind: str, family: str, objects: tuple[int, int] = OBJECTS) -> Scene:
    """A scene whose question of ``family`` has exactly one answer (layouts are redrawn until so)."""
    if family not in FAMILIES[kind]:
        raise ValueError(f"family {family!r} for kind {kind!r}: allowed are {', '.join(FAMILIES[kind])}")
    low = max(objects[0], 2 if family in ("spatial", "superlative") else 1)
    for _ in range(200):
        layout = _layout(rng, rng.randint(low, max(low, objects[1])))
        made = ask(layout, rng, kind, family)
        if made is not None:
            break
    else:  # pragma: no cover - 200 failed layouts would mean a bug in the builders
        raise RuntimeError(f"no {family} question found for 200 layouts")
    noise = np.random.default_rng(rng.getrandbits(63))
    image, index = render(layout, rng, noise)
    prompt, target, answer, about = made
    labels = patch_labels(index, layout)
    return Scene(image, prompt, kind, family, layout, labels, target, answer, about=about)


def ask(objs: list[Shape], rng: random.Random, kind: str, family: str) -> Made | None:
    """A question of ``family`` about the layout ``objs`` with exactly one answer, or None.

    Returns ``(prompt, target, answer, about)``: the prompt as a user types it, the target object's
    index (grounding) or the one-word answer (VQA), and the objects the answer is about (what
    training's pointing loss points at). Training asks several of these about one image.
    """
    if family in ("spatial", "superlative") and len(objs) < 2:
        return None
    made = _BUILDERS[family](objs, rng)
    if made is None:
        return None
    text, target, answer, about = made
    return (GROUND_PROMPT.format(text) if kind == "ground" else text), target, answer, about


# ---- layouts -----------------------------------------------------------------------------------


def _layout(rng: random.Random, count: int) -> list[Shape]:
    """``count`` non-overlapping objects, colours and shapes from a small per-scene palette."""
    colors = rng.sample(list(COLORS), k=min(len(COLORS), max(2, (count + 1) // 2 + rng.randint(0, 1))))
    shapes = rng.sample(list(SHAPES), k=min(len(SHAPES), max(2, (count + 1) // 2 + rng.randint(0, 1))))
    top = int(min(120, 230 / count**0.5))
    placed: list[Shape] = []
    for _ in range(count):
        for attempt in range(80):
            side = rng.uniform(44, max(46, top * 0.97**attempt))
            aspect = rng.uniform(0.8, 1.25)
            w, h = int(min(side * aspect, SIZE - 4)), int(min(side / aspect, SIZE - 4))
            x1, y1 = rng.randint(2, SIZE - 2 - w), rng.randint(2, SIZE - 2 - h)
            box = (x1, y1, x1 + w, y1 + h)
            if all(_apart(box, other.box) for other in placed):
                placed.append(Shape(rng.choice(shapes), rng.choice(colors), box, rng.choice(TEXTURES)))
                break
    return placed


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int = 5) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# ---- descriptions --------------------------------------------------------------------------------

Desc = tuple[str | None, str | None]  # (colour, shape); None = any


def _matches(objs: Sequence[Shape], desc: Desc) -> list[int]:
    color, shape = desc
    return [
        k
        for k, o in enumerate(objs)
        if (color is None or o.color == color) and (shape is None or o.shape == shape)
    ]


def _words(desc: Desc, plural: bool = False) -> str:
    color, shape = desc
    noun = shape or "shape"
    noun = noun + "s" if plural else noun
    return f"{color} {noun}" if color else noun


def _unique_descs(objs: Sequence[Shape], k: int) -> list[Desc]:
    o = objs[k]
    options: list[Desc] = [(None, o.shape), (o.color, None), (o.color, o.shape)]
    return [d for d in options if _matches(objs, d) == [k]]


def _extreme(objs: Sequence[Shape], pool: list[int], how: str) -> int | None:
    """The object of ``pool`` that is ``how`` (a key of :data:`EXTREMES`) by a clear margin, else None."""
    axis, sign = EXTREMES[how]
    if axis == "area":
        ranked = sorted(pool, key=lambda k: -sign * objs[k].area)
        first, second = objs[ranked[0]].area, objs[ranked[1]].area
        clear = max(first, second) >= _SIZE_RATIO * min(first, second)
    else:
        ranked = sorted(pool, key=lambda k: -sign * objs[k].center[axis])
        clear = abs(objs[ranked[0]].center[axis] - objs[ranked[1]].center[axis]) >= _POS_MARGIN
    return ranked[0] if clear else None


#: (question text, grounding target or None, VQA answer or None, the objects the answer is about:
#: the target, the object asked about, the objects counted, or the object a "yes" names)
Made = tuple[str, int | None, str | None, tuple[int, ...]]


def _attribute(objs: list[Shape], rng: random.Random) -> Made | None:
    k = rng.randrange(len(objs))
    descs = _unique_descs(objs, k)
    if not descs:
        return None
    both = [d for d in descs if d[0] and d[1]]  # prefer the combination when it is needed
    desc = both[0] if both and len(descs) == 1 else rng.choice(descs)
    return f"the {_words(desc)}", k, None, (k,)


def _spatial(objs: list[Shape], rng: random.Random) -> Made | None:
    t, a = rng.sample(range(len(objs)), 2)
    anchor = _unique_descs(objs, a)
    target_descs: list[Desc] = [(None, objs[t].shape), (objs[t].color, None), (objs[t].color, objs[t].shape)]
    rng.shuffle(target_descs)
    for desc in target_descs:
        pool = [k for k in _matches(objs, desc) if k != a]
        if len(pool) < 2 or not anchor:
            continue
        for rel in rng.sample(list(RELATIONS), len(RELATIONS)):
            axis, sign = RELATIONS[rel]
            offset = {k: sign * (objs[k].center[axis] - objs[a].center[axis]) for k in pool}
            if offset[t] >= 12 and all(offset[k] <= 0 for k in pool if k != t):
                return f"the {_words(desc)} {rel} the {_words(rng.choice(anchor))}", t, None, (t,)
    return None


def _superlative_pick(
    objs: list[Shape], rng: random.Random, with_shape: bool, with_color: bool
) -> tuple[str, int] | None:
    k = rng.randrange(len(objs))
    desc: Desc = (objs[k].color if with_color else None, objs[k].shape if with_shape else None)
    pool = _matches(objs, desc)
    if len(pool) < 2:
        return None
    how = rng.choice(list(EXTREMES))
    winner = _extreme(objs, pool, how)
    return (f"the {how} {_words(desc)}", winner) if winner is not None else None


def _superlative(objs: list[Shape], rng: random.Random) -> Made | None:
    mode = rng.randrange(3)
    picked = _superlative_pick(objs, rng, with_shape=mode == 1, with_color=mode == 2)
    return (picked[0], picked[1], None, (picked[1],)) if picked else None


def _vqa_color(objs: list[Shape], rng: random.Random) -> Made | None:
    if rng.random() < 0.5:
        k = rng.randrange(len(objs))
        if _matches(objs, (None, objs[k].shape)) != [k]:
            return None
        text = f"the {objs[k].shape}"
    else:
        picked = (
            _superlative_pick(objs, rng, with_shape=rng.random() < 0.5, with_color=False)
            if len(objs) > 1
            else None
        )
        if picked is None:
            return None
        text, k = picked
    return f"What color is {text}?", None, objs[k].color, (k,)


def _vqa_shape(objs: list[Shape], rng: random.Random) -> Made | None:
    if rng.random() < 0.5:
        k = rng.randrange(len(objs))
        if _matches(objs, (objs[k].color, None)) != [k]:
            return None
        text = f"the {objs[k].color} shape"
    else:
        picked = (
            _superlative_pick(objs, rng, with_shape=False, with_color=rng.random() < 0.5)
            if len(objs) > 1
            else None
        )
        if picked is None:
            return None
        text, k = picked
    return f"What shape is {text}?", None, objs[k].shape, (k,)


def _vqa_count(objs: list[Shape], rng: random.Random) -> Made | None:
    k = rng.randrange(len(objs))
    mode = rng.randrange(3)
    desc: Desc = (objs[k].color if mode != 1 else None, objs[k].shape if mode != 0 else None)
    if rng.random() < 0.15:  # sometimes ask about something absent: the answer 0
        desc = (rng.choice(list(COLORS)) if mode != 1 else None, rng.choice(SHAPES) if mode != 0 else None)
    counted = _matches(objs, desc)
    return f"How many {_words(desc, plural=True)} are there?", None, str(len(counted)), tuple(counted)


def _vqa_yesno(objs: list[Shape], rng: random.Random) -> Made | None:
    if rng.random() < 0.5:
        k = rng.randrange(len(objs))
        named = tuple(_matches(objs, (objs[k].color, objs[k].shape)))
        return f"Is there a {objs[k].color} {objs[k].shape}?", None, "yes", named
    present_colors = sorted({o.color for o in objs})
    present_shapes = sorted({o.shape for o in objs})
    pairs = [(c, s) for c in present_colors for s in present_shapes if not _matches(objs, (c, s))]
    if not pairs:  # every combination is present: ask about an absent colour or shape instead
        pairs = [(c, s) for c in COLORS for s in SHAPES if not _matches(objs, (c, s))]
    color, shape = rng.choice(pairs)
    return f"Is there a {color} {shape}?", None, "no", ()


_BUILDERS: dict[str, Callable[[list[Shape], random.Random], Made | None]] = {
    "attribute": _attribute,
    "spatial": _spatial,
    "superlative": _superlative,
    "color": _vqa_color,
    "shape": _vqa_shape,
    "count": _vqa_count,
    "yesno": _vqa_yesno,
}
