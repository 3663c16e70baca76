"""Box parsers for each model family's grounding output, and the conversion to normalised coordinates.

Every parser returns a box ``(x1, y1, x2, y2)`` normalised to ``[0, 1]`` of the image (lmms-eval's RefCOCO
convention: the *original* image's width and height), or ``None`` when the answer holds no usable box.
``None`` scores as a miss for every metric; no input string raises. Each family is read in one way,
chosen from the family (:data:`vlm_reroute.families.FAMILIES` names its format), never from the answer's
values: a value above 1 under a ``[0, 1]`` format is clipped, not reinterpreted as pixels.

Formats (:data:`FORMATS`; sources checked 2026-12, see ``docs/evaluation.md`` for the table):

* ``llava`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): floats in ``[0, 1]`` in square brackets,
  ``[x1, y1, x2, y2]`` of the original image, asked with lmms-eval's prompt verbatim. Sources: lmms-eval
  ``lmms_eval/tasks/refcoco/utils_rec.py`` (``refcoco_bbox_rec_doc_to_text``, ``parse_float_sequence_within``;
  the same task for every model, no per-model variant); LLaVA-1.5's RefCOCO training format
  (arXiv 2310.03744, §4 data mixture), which LLaVA-NeXT and OneVision inherit.
* ``qwen2_vl``: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` with coordinates in ``[0, 1000)`` of the
  image (arXiv 2409.12191 §2.1 "Visual grounding"); ``skip_special_tokens`` strips the box tokens, so
  the parenthesised pair alone is read too.
* ``qwen2_5_vl``: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in *pixels of the resized input*
  (arXiv 2502.13923 §2.2.1, absolute coordinates), divided by the resized width / height — not by the
  original size, the mistake of the published Reroute patch. A bare ``[x1, y1, x2, y2]`` is read in the
  same units.
* ``qwen3_vl`` (Qwen3-VL dense and MoE, Qwen3.5): JSON ``bbox_2d`` or a bare list on a 0–1000 grid of the
  image. Qwen3-VL's cookbook (``QwenLM/Qwen3-VL`` ``cookbooks/2d_grounding.ipynb``): "Qwen3-VL's default
  coordinate system has been changed from the absolute coordinates used in Qwen2.5-VL to relative
  coordinates ranging from 0 to 1000", drawn as ``bbox_2d[0] / 1000 * width``. The repo's ODinW script
  (``evaluation/ODinW-13/run_odinw.py``) reads resized pixels unless ``is_rel=1`` and the fine-tuning
  README's example holds a pixel box (``[135, 114, 1016, 672]``): we follow the cookbook's statement of
  the default, one reading. Qwen3.5 has no official statement of its format (its cards and Qwen's repos
  were searched); it shares Qwen3-VL's vision stack and processor, and the published Reroute release runs
  it with this reading (``scale_1000``) and prompt (as issue 18 reports; that patch could not be re-read).
* ``internvl`` (InternVL 1.5 → 3): ``<ref>…</ref><box>[[x1, y1, x2, y2]]</box>`` as integers on 0–1000
  of the original width and height:
  ``OpenGVLab/InternVL`` ``internvl_chat/eval/refcoco/evaluate_grounding.py`` (prompt, the regex
  ``\\[*\\[(.*?),(.*?),(.*?),(.*?)\\]\\]*``, then ``/ 1000 * (w, h)``). That script divides by 1000 only
  when the four values sum to at least 4 — a switch on the answer's values we do not copy. The box tags
  are special tokens and may be stripped; ``[[...]]`` or ``[...]`` alone is read too.

Families without a format (Idefics3, SmolVLM: their cards list captioning and VQA, no box output) raise
:class:`NoGroundingFormat` from :func:`parser_for`.

Shared rules: the first box in the answer counts (as in lmms-eval); coordinates outside the image are
clipped to it; a box that is empty or inverted after clipping is a miss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..families import FAMILIES, get_family

Box = tuple[float, float, float, float]
#: ``parse(text, input_width, input_height)``: the size of the image the model saw (pixel formats use it).
Parser = Callable[[str, int, int], "Box | None"]

SCALE_1000 = 1000.0
QWEN2_VL_SCALE = SCALE_1000

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"\s*,\s*"
_BRACKET_4 = re.compile(rf"\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]")
_BBOX_2D = re.compile(
    rf"[\"']bbox_2d[\"']\s*:\s*\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]"
)
_PAREN_PAIRS = re.compile(rf"\(\s*({_NUM}){_SEP}({_NUM})\s*\)\s*,?\s*\(\s*({_NUM}){_SEP}({_NUM})\s*\)")


class NoGroundingFormat(ValueError):
    """The family is known but has no documented grounding format: it is evaluated on VQA tasks only.

    A ``ValueError`` of its own, so that a caller can tell "no format is documented" (Idefics3,
    SmolVLM) from an unknown family name; no format is guessed.
    """


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


def _json_or_list(text: str) -> Box | None:
    """The first ``"bbox_2d": [...]``, else the first bare ``[a, b, c, d]`` (Qwen2.5-VL / Qwen3-VL)."""
    return _floats(_BBOX_2D.search(text)) or _floats(_BRACKET_4.search(text))


def parse_llava(text: str) -> Box | None:
    """LLaVA-1.5 / NeXT / OneVision: the first ``[x1, y1, x2, y2]`` of normalised floats."""
    return normalise(_floats(_BRACKET_4.search(text or "")), 1.0, 1.0)


def parse_qwen2_vl(text: str) -> Box | None:
    """Qwen2-VL: the first ``(x1,y1),(x2,y2)`` pair in ``[0, 1000)`` (box tokens optional)."""
    return normalise(_floats(_PAREN_PAIRS.search(text or "")), QWEN2_VL_SCALE, QWEN2_VL_SCALE)


def parse_qwen2_5_vl(text: str, input_width: int, input_height: int) -> Box | None:
    """Qwen2.5-VL: the first ``"bbox_2d": [...]`` in pixels of the ``input_width`` × ``input_height`` input.

    A bare ``[x1, y1, x2, y2]`` (no key, e.g. after an unusual prompt) is read in the same pixel units.
    """
    return normalise(_json_or_list(text or ""), input_width, input_height)


def parse_qwen3_vl(text: str) -> Box | None:
    """Qwen3-VL / Qwen3.5: the first ``"bbox_2d": [...]`` (else bare list) on the 0–1000 grid."""
    return normalise(_json_or_list(text or ""), SCALE_1000, SCALE_1000)


def parse_internvl(text: str) -> Box | None:
    """InternVL: the first ``[[x1, y1, x2, y2]]`` (``<box>`` tags optional, single brackets too) on 0–1000."""
    return normalise(_floats(_BRACKET_4.search(text or "")), SCALE_1000, SCALE_1000)


@dataclass(frozen=True)
class GroundingFormat:
    """How a family is asked for a box and how its answer is read.

    ``prompt`` holds ``{expression}``; ``frame`` says which image the coordinates refer to; ``resized``: the
    task hands the model the image resized by Qwen's ``smart_resize`` (multiples of 28) so that the input
    size is known exactly (the pixel format divides by it); ``stop``: the task's stop strings.

    References
    ----------
    One source per format (the module docstring quotes them): LLaVA-1.5, arXiv 2310.03744 (§4), with
    lmms-eval's RefCOCO prompt; Qwen2-VL, arXiv 2409.12191 (§2.1); Qwen2.5-VL, arXiv 2502.13923
    (§2.2.1); Qwen3-VL's grounding cookbook; InternVL's ``evaluate_grounding.py``.
    """

    name: str
    prompt: str
    parse: Parser
    frame: str
    answer: str
    resized: bool = False
    stop: tuple[str, ...] = ()


LLAVA_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
    "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
    "bounding box coordinate of the region this sentence describes: {expression}"
)  # lmms-eval's refcoco_bbox_rec prompt, verbatim
# the paper's (Nüwa/VScan) prompt, Qwen's own wording in the Qwen3-VL fine-tuning README's grounding example
QWEN_JSON_PROMPT = "Locate {expression} in this image and output the bbox coordinates in JSON format."
QWEN2_VL_PROMPT = (
    "Output the bounding box of <|object_ref_start|>{expression}<|object_ref_end|> in the image."
)
INTERNVL_PROMPT = (
    "Please provide the bounding box coordinate of the region this sentence describes: "
    "<ref>{expression}</ref>"
)

FORMATS: dict[str, GroundingFormat] = {
    "llava": GroundingFormat(
        "llava",
        LLAVA_PROMPT,
        lambda text, w, h: parse_llava(text),
        "original image",
        "[x1, y1, x2, y2] floats in [0, 1]",
        stop=("ASSISTANT:",),
    ),
    "qwen2_vl": GroundingFormat(
        "qwen2_vl",
        QWEN2_VL_PROMPT,
        lambda text, w, h: parse_qwen2_vl(text),
        "image, 0-1000 grid",
        "<|box_start|>(x1,y1),(x2,y2)<|box_end|> in [0, 1000)",
        resized=True,  # as before; its 0-1000 reading does not need the input size
    ),
    "qwen2_5_vl": GroundingFormat(
        "qwen2_5_vl",
        QWEN_JSON_PROMPT,
        parse_qwen2_5_vl,
        "resized input (smart_resize), pixels",
        '{"bbox_2d": [x1, y1, x2, y2]} in pixels',
        resized=True,
    ),
    "qwen3_vl": GroundingFormat(
        "qwen3_vl",
        QWEN_JSON_PROMPT,
        lambda text, w, h: parse_qwen3_vl(text),
        "image, 0-1000 grid",
        '{"bbox_2d": [x1, y1, x2, y2]} or [x1, y1, x2, y2] on 0-1000',
    ),
    "internvl": GroundingFormat(
        "internvl",
        INTERNVL_PROMPT,
        lambda text, w, h: parse_internvl(text),
        "original image, 0-1000 grid",
        "<ref>...</ref><box>[[x1, y1, x2, y2]]</box> on 0-1000",
    ),
}


def format_for(family: str) -> GroundingFormat:
    """The grounding format of ``family``: ``ValueError`` for an unknown name, :class:`NoGroundingFormat`
    for a family without one (Idefics3, SmolVLM)."""
    entry = get_family(family)
    if entry.grounding is None:
        with_format = ", ".join(f.name for f in FAMILIES if f.grounding is not None)
        raise NoGroundingFormat(
            f"family={family!r} has no documented grounding format (its model cards list captioning and "
            f"VQA); evaluate it on VQA tasks. Families with one: {with_format}"
        )
    return FORMATS[entry.grounding]


def parser_for(family: str) -> Parser:
    """The parser of ``family``: ``parse(text, input_width, input_height)`` → normalised box or ``None``.

    Every family name of :data:`vlm_reroute.families.FAMILIES` is known; see :func:`format_for` for the
    two errors.
    """
    return format_for(family).parse
