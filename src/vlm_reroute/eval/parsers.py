"""Box parsers for each model family's grounding output, and the conversion to normalised coordinates.

Every parser returns a box ``(x1, y1, x2, y2)`` normalised to ``[0, 1]`` by the *original* image's width
and height (lmms-eval's RefCOCO convention), or ``None`` when the answer holds no usable box. ``None``
scores as a miss for every metric; no input string raises.

Family formats:

* LLaVA-1.5: floats in ``[0, 1]`` in square brackets, ``[x1, y1, x2, y2]`` (its RefCOCO training format
  and lmms-eval's ``refcoco_bbox_rec`` prompt).
* Qwen2.5-VL: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in *pixels of the resized input*
  (arXiv 2502.13923 §2.2.1: absolute coordinates); divided by the resized width / height.
* Qwen2-VL: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` with coordinates in ``[0, 1000)``
  (arXiv 2409.12191 §2.1); the box tokens are often stripped by ``skip_special_tokens``, so the
  parenthesised pair alone is accepted too.

Shared rules: the first box in the answer counts (as in lmms-eval); coordinates outside the image are
clipped to it; a box that is empty or inverted after clipping is a miss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

Box = tuple[float, float, float, float]

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
QWEN2_VL_SCALE = 1000.0

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"\s*,\s*"
_BRACKET_4 = re.compile(rf"\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]")
_BBOX_2D = re.compile(
    rf"[\"']bbox_2d[\"']\s*:\s*\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]"
)
_PAREN_PAIRS = re.compile(rf"\(\s*({_NUM}){_SEP}({_NUM})\s*\)\s*,?\s*\(\s*({_NUM}){_SEP}({_NUM})\s*\)")


def _floats(match: re.Match | None) -> Box | None:
    if match is None:
        return None
    values = tuple(float(g) for g in match.groups())
    return values if all(math.isfinite(v) for v in values) else None  # type: ignore[return-value]


def normalise(box: Box | None, width: float, height: float) -> Box | None:
    """``box`` in units where the image is ``width`` × ``height`` → ``[0, 1]``, clipped; ``None`` if empty."""
    if box is None:
        return None
    if not (width > 0 and height > 0):
        raise ValueError(f"image size {width}x{height}: width and height must be positive")
    x1, y1, x2, y2 = box
    clipped = (
        min(max(x1 / width, 0.0), 1.0),
        min(max(y1 / height, 0.0), 1.0),
        min(max(x2 / width, 0.0), 1.0),
        min(max(y2 / height, 0.0), 1.0),
    )
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None
    return clipped


def parse_llava(text: str) -> Box | None:
    """LLaVA-1.5: the first ``[x1, y1, x2, y2]`` of normalised floats."""
    return normalise(_floats(_BRACKET_4.search(text or "")), 1.0, 1.0)


def parse_qwen2_5_vl(text: str, input_width: int, input_height: int) -> Box | None:
    """Qwen2.5-VL: the first ``"bbox_2d": [...]`` in pixels of the ``input_width`` × ``input_height`` input.

    A bare ``[x1, y1, x2, y2]`` (no key, e.g. after an unusual prompt) is accepted as a fallback, in the
    same pixel units.
    """
    text = text or ""
    box = _floats(_BBOX_2D.search(text)) or _floats(_BRACKET_4.search(text))
    return normalise(box, input_width, input_height)


def parse_qwen2_vl(text: str) -> Box | None:
    """Qwen2-VL: the first ``(x1,y1),(x2,y2)`` pair in ``[0, 1000)`` (box tokens optional)."""
    return normalise(_floats(_PAREN_PAIRS.search(text or "")), QWEN2_VL_SCALE, QWEN2_VL_SCALE)


def parser_for(family: str) -> Callable[..., Box | None]:
    """The parser of ``family`` (one of :data:`FAMILIES`)."""
    parsers = {"llava": parse_llava, "qwen2_vl": parse_qwen2_vl, "qwen2_5_vl": parse_qwen2_5_vl}
    if family not in parsers:
        raise ValueError(f"family={family!r}: allowed are {', '.join(FAMILIES)}")
    return parsers[family]
