"""The model families vlm-reroute routes, in one table that the testing kit, the evaluation and the CLI read.

Each :class:`Family` names what code elsewhere needs to know about a family without loading it: the
``transformers`` class and config ``model_type`` that identify a checkpoint, the adapter that routes it,
how its image resolution is set, and which grounding (RefCOCO) answer format it was trained on — a key of
:data:`vlm_reroute.eval.parsers.FORMATS`, or ``None`` when the family has no documented grounding format
and is evaluated on VQA tasks only. Adding a family is one entry here plus its adapter (and, for the
tests, its tiny model in :mod:`vlm_reroute.testing`).

Torch-free on purpose: ``vlm-reroute eval --dry-run``, ``vlm-reroute budget``, the lmms-eval manifest and
the torch-free methods read it without importing a model library. Code outside the adapters asks this
table (or the model's adapter) what a family is, and never compares family names itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .budget.stage1 import CLIP, MERGER_VIT, WINDOWED_VIT


@dataclass(frozen=True)
class Family:
    """One model family: its name (as the adapters, tests and task names spell it) and what identifies it.

    ``grounding`` is the key of the family's RefCOCO answer format (several families share one: LLaVA-NeXT
    and OneVision answer as LLaVA-1.5 does), ``None`` for VQA-only families. ``qwen_pixels``: the image
    resolution is bounded by ``min_pixels`` / ``max_pixels`` (Qwen's dynamic resolution); the other
    families tile or resize to their own fixed sizes. ``fixed_grid``: every image is the vision tower's
    ``(image_size / patch_size)²`` patch grid whatever its size, so the config alone gives the count.
    ``vision``: the kind of vision tower a vision-side stage reads (Nüwa's stage 1:
    :data:`~vlm_reroute.budget.stage1.CLIP`, :data:`~vlm_reroute.budget.stage1.WINDOWED_VIT` or
    :data:`~vlm_reroute.budget.stage1.MERGER_VIT`), ``None``
    when no vision-side stage is defined for the family. For the multi-view families it names the
    release whose constants Nüwa uses (LLaVA-NeXT, OneVision: the CLIP / LLaVA release; InternVL,
    Idefics3, SmolVLM: the merger release), not the tower's architecture.
    """

    name: str
    label: str
    model_class: str
    model_type: str
    adapter: str
    grounding: str | None
    qwen_pixels: bool = False
    fixed_grid: bool = False
    vision: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family(
        "llava",
        "LLaVA-1.5",
        "LlavaForConditionalGeneration",
        "llava",
        "LlavaAdapter",
        "llava",
        fixed_grid=True,
        vision=CLIP,
    ),
    Family(
        "llava_next",
        "LLaVA-NeXT",
        "LlavaNextForConditionalGeneration",
        "llava_next",
        "LlavaNextAdapter",
        "llava",
        vision=CLIP,  # Nüwa: the LLaVA release's constants (nuwa.md §4 keeps DIST = 280 and stage 2 at 16/32)
    ),
    Family(
        "llava_onevision",
        "LLaVA-OneVision",
        "LlavaOnevisionForConditionalGeneration",
        "llava_onevision",
        "LlavaNextAdapter",
        "llava",
        vision=CLIP,  # Nüwa: LLaVA-NeXT's layout, so its release (docs/methods.md "Nüwa on multi-view")
    ),
    Family(
        "qwen2_vl",
        "Qwen2-VL",
        "Qwen2VLForConditionalGeneration",
        "qwen2_vl",
        "Qwen2VLAdapter",
        "qwen2_vl",
        True,
        vision=MERGER_VIT,
    ),
    Family(
        "qwen2_5_vl",
        "Qwen2.5-VL",
        "Qwen2_5_VLForConditionalGeneration",
        "qwen2_5_vl",
        "Qwen2VLAdapter",
        "qwen2_5_vl",
        True,
        vision=WINDOWED_VIT,
    ),
    Family(
        "qwen3_vl",
        "Qwen3-VL",
        "Qwen3VLForConditionalGeneration",
        "qwen3_vl",
        "Qwen3VLAdapter",
        "qwen3_vl",
        True,
        vision=MERGER_VIT,
    ),
    Family(
        "qwen3_vl_moe",
        "Qwen3-VL-MoE",
        "Qwen3VLMoeForConditionalGeneration",
        "qwen3_vl_moe",
        "Qwen3VLAdapter",
        "qwen3_vl",
        True,
        vision=MERGER_VIT,
    ),
    Family(
        "qwen3_5",
        "Qwen3.5",
        "Qwen3_5ForConditionalGeneration",
        "qwen3_5",
        "Qwen3_5Adapter",
        "qwen3_vl",
        True,
        vision=MERGER_VIT,
    ),
    # Nüwa on tiles: pixel-shuffled (merged) tokens, as Qwen's merger gives, so the Qwen release's constants
    Family(
        "internvl",
        "InternVL3",
        "InternVLForConditionalGeneration",
        "internvl",
        "InternVLAdapter",
        "internvl",
        vision=MERGER_VIT,
    ),
    Family(
        "idefics3",
        "Idefics3",
        "Idefics3ForConditionalGeneration",
        "idefics3",
        "Idefics3Adapter",
        None,
        vision=MERGER_VIT,
    ),
    Family(
        "smolvlm",
        "SmolVLM",
        "SmolVLMForConditionalGeneration",
        "smolvlm",
        "Idefics3Adapter",
        None,
        vision=MERGER_VIT,
    ),
)
_BY_NAME: Mapping[str, Family] = {f.name: f for f in FAMILIES}


def family_names() -> tuple[str, ...]:
    """Every family name, in table order."""
    return tuple(_BY_NAME)


def grounding_families() -> tuple[str, ...]:
    """The families with a grounding format (they get RefCOCO task variants)."""
    return tuple(f.name for f in FAMILIES if f.grounding is not None)


def get_family(name: str) -> Family:
    """The family called ``name``; ``ValueError`` lists the known names."""
    if name not in _BY_NAME:
        raise ValueError(f"family={name!r}: allowed are {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def family_of_class(class_name: str) -> Family:
    """The family of a model class name (``type(model).__name__`` or a config's ``architectures`` entry)."""
    for family in FAMILIES:
        if family.model_class == class_name:
            return family
    raise ValueError(
        f"model class {class_name} is none of the supported families' classes: "
        f"{', '.join(f.model_class for f in FAMILIES)}"
    )


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family whose configs have ``model_type``, or None (a config of any other model)."""
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def vision_families(kind: str) -> tuple[Family, ...]:
    """The families whose vision tower is of ``kind`` (see :attr:`Family.vision`), in table order."""
    return tuple(f for f in FAMILIES if f.vision == kind)


def family_of_config(config: Any) -> Family:
    """The family of a model config: its first supported ``architectures`` entry, else its ``model_type``.

    The architecture decides when present (a checkpoint names the class it was saved from); configs
    built in code carry none, and their ``model_type`` decides.
    """
    architectures: Sequence[str] = getattr(config, "architectures", None) or []
    classes = {f.model_class: f for f in FAMILIES}
    for name in architectures:
        if name in classes:
            return classes[name]
    model_type = getattr(config, "model_type", None)
    family = family_of_model_type(model_type)
    if family is not None:
        return family
    found = ", ".join(architectures) or str(model_type)
    raise ValueError(
        f"a {found} checkpoint is none of the supported families "
        f"({', '.join(f.model_class for f in FAMILIES)})"
    )


def family_of_checkpoint(path_or_id: str) -> Family:
    """The family of a checkpoint folder or Hub id, from its ``config.json`` alone (no weights, no torch).

    A local folder is read directly; a Hub id goes through ``huggingface_hub`` (cache first).
    """
    import json
    from pathlib import Path

    folder = Path(path_or_id).expanduser()
    if folder.is_dir():
        config_path = folder / "config.json"
    elif folder.exists() or path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1:
        raise ValueError(f"no model folder at {path_or_id!r} (a folder with config.json, or a Hub id)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            config_path = Path(hf_hub_download(path_or_id, "config.json"))
        except Exception as exc:  # the Hub client's errors (offline, no such repo, ...): one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"cannot read the config of {path_or_id!r} from the Hub ({first})") from exc
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the config of {path_or_id!r} ({exc})") from exc

    class _Config:
        architectures = data.get("architectures")
        model_type = data.get("model_type")

    return family_of_config(_Config())
