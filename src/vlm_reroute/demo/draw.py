"""Drawing the demo scenes: textured shapes with outlines on a cluttered, noisy background.

The scenes are built for the regime visual-token reduction is studied in: an object spans 3–8
patches of 16 px across, its interior is textured (stripes, dots, checks) and outlined, and the
background carries low-saturation clutter and pixel noise. So, as in natural images, many patches
say the same thing (an object's interior repeats), while the extent of an object, which a box
needs, lives in its border patches. Everything here is a pure function of the ``random.Random``
and the numpy generator it is handed, so a seed gives the same pixels on any machine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
PATCH = 16
GRID = SIZE // PATCH

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 155, 60),
    "blue": (45, 85, 215),
    "yellow": (228, 200, 40),
    "purple": (140, 60, 185),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
TEXTURES = ("solid", "stripes", "dots", "checks")


@dataclass(frozen=True)
class Shape:
    """One drawn object: what it is and where (``box`` is the tight pixel box of what is drawn).

    The referring expressions and the grounding answers are computed from these, never from pixels.
    """

    shape: str
    color: str
    box: tuple[int, int, int, int]
    texture: str

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def area(self) -> int:
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)


def outline(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    """Polygon vertices of ``shape`` filling ``box`` (``None`` for the circle, drawn as an ellipse)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "star":  # five points; the bounding box of these vertices is ``box`` by construction
        raw = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            raw.append((r * math.cos(a), r * math.sin(a)))
        xs, ys = [p[0] for p in raw], [p[1] for p in raw]
        sx, sy = (x2 - x1) / (max(xs) - min(xs)), (y2 - y1) / (max(ys) - min(ys))
        return [(x1 + (px - min(xs)) * sx, y1 + (py - min(ys)) * sy) for px, py in raw]
    raise ValueError(f"shape {shape!r}: allowed are {', '.join(SHAPES)}")


def _rgb(channels: Iterable[float]) -> tuple[int, int, int]:
    """Three channel values, each clipped to 0..255."""
    r, g, b = (int(min(255, max(0, c))) for c in channels)
    return r, g, b


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return _rgb(c * factor for c in rgb)


def _background(rng: random.Random, noise: np.random.Generator) -> np.ndarray:
    """A muted two-tone gradient; clutter and noise are added after the objects' layer is known."""
    base = np.array([rng.uniform(95, 175)] * 3) + np.array([rng.uniform(-18, 18) for _ in range(3)])
    tilt = np.array([rng.uniform(-35, 35) for _ in range(3)])
    ramp = np.linspace(-0.5, 0.5, SIZE)
    if rng.random() < 0.5:
        grad = ramp[None, :, None] * tilt[None, None, :]
    else:
        grad = ramp[:, None, None] * tilt[None, None, :]
    image = np.broadcast_to(base, (SIZE, SIZE, 3)) + grad
    return image + noise.normal(0.0, 4.0, (SIZE, SIZE, 1))


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    """Thin low-saturation strokes and specks smaller than a patch: texture, never an object."""
    for _ in range(rng.randint(18, 34)):
        grey = rng.randint(60, 210)
        tint = tuple(min(255, max(0, grey + rng.randint(-20, 20))) for _ in range(3))
        x, y = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
        if rng.random() < 0.6:
            a, n = rng.uniform(0, math.pi), rng.uniform(6, 22)
            draw.line(
                [(x, y), (x + n * math.cos(a), y + n * math.sin(a))], fill=tint, width=rng.randint(1, 2)
            )
        else:
            r = rng.uniform(1.5, 4.5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tint)


def _texture(kind: str, rgb: tuple[int, int, int], rng: random.Random) -> np.ndarray:
    """An RGB layer over the whole canvas: the object's colour with its pattern in a lighter shade."""
    jitter = _rgb(c + rng.randint(-14, 14) for c in rgb)
    layer = np.empty((SIZE, SIZE, 3), dtype=np.float64)
    layer[:] = jitter
    alt = np.array(_shade(jitter, rng.choice((0.7, 1.3))), dtype=np.float64)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period = rng.randint(6, 10)
    if kind == "stripes":
        pattern = ((xx + yy) // period) % 2 == 0 if rng.random() < 0.5 else (xx - yy) // period % 2 == 0
    elif kind == "dots":
        pattern = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.2) ** 2
    elif kind == "checks":
        pattern = ((xx // period) + (yy // period)) % 2 == 0
    else:
        pattern = np.zeros((SIZE, SIZE), dtype=bool)
    layer[pattern] = alt
    return layer


def render(
    objects: list[Shape], rng: random.Random, noise: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """The scene's image and its object map (``SIZE`` × ``SIZE``, 0 = background, k + 1 = object k)."""
    canvas = Image.fromarray(np.clip(_background(rng, noise), 0, 255).astype(np.uint8))
    _clutter(ImageDraw.Draw(canvas), rng)
    pixels = np.asarray(canvas, dtype=np.float64).copy()
    index = Image.new("L", (SIZE, SIZE), 0)
    for k, obj in enumerate(objects):
        mask_img = Image.new("L", (SIZE, SIZE), 0)
        points = outline(obj.shape, obj.box)
        mask_draw, index_draw = ImageDraw.Draw(mask_img), ImageDraw.Draw(index)
        if points is None:
            mask_draw.ellipse(obj.box, fill=255)
            index_draw.ellipse(obj.box, fill=k + 1)
        else:
            mask_draw.polygon(points, fill=255)
            index_draw.polygon(points, fill=k + 1)
        mask = np.asarray(mask_img) > 0
        pixels[mask] = _texture(obj.texture, COLORS[obj.color], rng)[mask]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in objects:  # a darker rim: the part of an object that says where it ends
        rim = _shade(COLORS[obj.color], 0.55)
        points = outline(obj.shape, obj.box)
        if points is None:
            draw.ellipse(obj.box, outline=rim, width=3)
        else:
            draw.line([*points, points[0]], fill=rim, width=3, joint="curve")
    final = np.asarray(image, dtype=np.float64) + noise.normal(0.0, 6.0, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(final, 0, 255).astype(np.uint8)), np.asarray(index)


def patch_labels(index: np.ndarray, objects: list[Shape], min_cover: float = 0.3) -> np.ndarray:
    """Per patch (row-major, ``GRID²``), the object covering at least ``min_cover`` of it, else -1.

    Training's auxiliary targets: each visual token learns what lies under it (colour, shape and the
    box of its object), which spreads an object's identity and extent over all of its patches.
    """
    blocks = index.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    labels = np.full(GRID * GRID, -1, dtype=np.int64)
    best = np.zeros(GRID * GRID)
    for k in range(len(objects)):
        cover = (blocks == k + 1).mean(axis=1)
        take = (cover >= min_cover) & (cover > best)
        labels[take], best[take] = k, cover[take]
    return labels
