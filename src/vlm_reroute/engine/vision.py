"""Vision-side stages: a reduction decided while the images are encoded, applied from decoder layer 0.

Nüwa (arXiv 2602.02951, ``nuwa.md`` §1, §3.1) keeps K₁ anchors per image *before* the language
model and rewrites their features. The engine runs such a stage as an irreversible **stage 0**:

1. **Encoding.** The method's :class:`VisionStage` hooks the vision side (tower, projector or
   merger) and reports every image it encodes as an :class:`EncodedImage`: the features the
   language model will receive for the image's placeholders (anchors already rewritten), which
   tokens enter the language model, the keep count of each later decision, and a trace record.
   ``transformers`` 5's ``generate()`` encodes the images *before* its first forward and passes
   ``mm_encoder_outputs``, so a report cannot be tied to a call: reports are kept per thread
   (:class:`Reports`) and matched to a prefill's images by content.
2. **Layer 0.** The executor finds, for each image of the prefill, the report whose features equal
   what the image's placeholders hold at the input of decoder layer 0, and gathers text + kept
   tokens once (:func:`stage_zero`); from layer 0 on only they exist: no later layer computes, and
   no KV cache holds, the other visual tokens. They keep their original position ids (1-D and
   MRoPE), so the first text token after an image sits where it sits in the untouched model.
3. **Decoding.** Every layer's cache is shorter than the prompt, but ``transformers`` reads the
   sequence length from ``cache.get_seq_length()`` (layer 0) to place new tokens. The routed cache
   therefore reports the *logical* length (prompt + generated tokens) when asked without a layer
   index, and each layer's real length when asked with one (:func:`report_logical_length`); masks
   use the per-layer sizes (``cache.get_mask_sizes``).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..adapters.layout import ImageLayout

__all__ = [
    "EncodedImage",
    "Reports",
    "StageZero",
    "VisionStage",
    "forget_logical_length",
    "report_logical_length",
    "stage_zero",
]


@dataclass(frozen=True)
class EncodedImage:
    """One image as a vision stage encoded it.

    ``features`` ``(N, D)``: what the language model receives for the image's ``N`` placeholders;
    ``kept`` ``(N,)`` bool: the tokens that enter the language model; ``scores`` ``(N,)`` float:
    the stage's ranking signal (the trace shows it); ``counts``: the keep count of each decision
    inside the language model; ``record``: what ``trace.stage1`` shows for the image.
    """

    features: torch.Tensor
    kept: torch.Tensor
    scores: torch.Tensor
    counts: tuple[int, ...]
    record: Any


class VisionStage(Protocol):
    """A method's stage on the vision side (see the module docstring)."""

    def install(
        self, model: nn.Module, report: Callable[[list[EncodedImage]], None]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Hook ``model``'s vision side; call ``report`` with the images of every encoding."""
        ...


class Reports:
    """The images encoded on each thread, newest last (a few encodings are kept).

    ``decide``: a stage that decides at layer 0 from the rows the language model receives (DivPrune
    needs nothing else, so it runs on every family without hooking the tower): it maps those rows,
    one ``(N_i, D)`` tensor per image, to the images' reports, and :meth:`match` asks it instead of
    looking up encodings."""

    def __init__(
        self, encodings: int = 4, decide: Callable[[list[torch.Tensor]], list[EncodedImage]] | None = None
    ) -> None:
        self.encodings = encodings
        self.decide = decide
        self.local = threading.local()

    def _queue(self) -> deque:
        if not hasattr(self.local, "queue"):
            self.local.queue = deque(maxlen=self.encodings)
        return self.local.queue

    def add(self, images: list[EncodedImage]) -> None:
        self._queue().append(list(images))

    def clear(self) -> None:
        self._queue().clear()

    def match(self, rows: Sequence[torch.Tensor]) -> list[EncodedImage]:
        """The report of each image whose placeholders hold ``rows[i]`` ``(N_i, D)``, newest first."""
        if self.decide is not None:
            return self.decide(list(rows))
        candidates = [image for batch in reversed(self._queue()) for image in batch]
        out = []
        for i, held in enumerate(rows):
            found = next((c for c in candidates if _same(c.features, held)), None)
            if found is None:
                raise ValueError(
                    f"image {i} of this prompt was not encoded inside the block: a vision-side stage "
                    "(Nüwa's stage 1) reduces images while the model encodes them, so pass pixel_values "
                    "to the routed model's forward or generate() inside the `with` block (image features "
                    "encoded elsewhere, e.g. mm_encoder_outputs computed before the block, cannot be reduced)"
                )
            out.append(found)
        return out


def _same(features: torch.Tensor, held: torch.Tensor) -> bool:
    if features.shape != held.shape:
        return False
    return torch.equal(features.to(device=held.device, dtype=held.dtype), held)


@dataclass(frozen=True)
class StageZero:
    """Stage 0 of one prefill: ``kept`` ``(B, N)`` bool (visual tokens entering the language model),
    ``scores`` ``(B, N)`` float32, ``counts`` per later decision ``(n_images,)`` and the trace
    ``records`` per sample, per image."""

    kept: torch.Tensor
    scores: torch.Tensor
    counts: list[torch.Tensor]
    records: list[list[Any]]


def stage_zero(
    reports: Reports,
    hidden: torch.Tensor,
    visual: torch.Tensor,
    image_ids: torch.Tensor,
    layouts: list[list[ImageLayout]],
    stages: int,
) -> StageZero:
    """Match the prefill's images to their reports and lay the result out over the batch.

    ``hidden`` ``(B, N, D)``: the input of decoder layer 0; ``image_ids`` numbers images over the
    batch in sample order, so the visual positions in row-major order are grouped by image.
    """
    sizes = torch.bincount(image_ids[visual]).tolist()
    images = reports.match(hidden[visual].split(sizes))
    kept = torch.zeros_like(visual)
    kept[visual] = torch.cat([image.kept.to(visual.device) for image in images])
    scores = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
    scores[visual] = torch.cat([image.scores.to(scores) for image in images])
    for image, size in zip(images, sizes, strict=True):
        if len(image.counts) != stages or image.kept.numel() != size:
            raise RuntimeError(
                f"a vision-stage report holds {len(image.counts)} stage counts for {image.kept.numel()} "
                f"tokens; this prefill needs {stages} for {size}"
            )
    counts = [
        torch.tensor([image.counts[s] for image in images], dtype=torch.long, device=visual.device)
        for s in range(stages)
    ]
    records: list[list[Any]] = []
    first = 0
    for sample in layouts:
        records.append([images[first + i].record for i in range(len(sample))])
        first += len(sample)
    return StageZero(kept=kept, scores=scores, counts=counts, records=records)


def report_logical_length(cache: Cache, removed: int) -> None:
    """Make ``cache.get_seq_length()`` (no layer index) report ``removed`` more tokens than layer 0 holds.

    An instance attribute on this cache only (no class is patched): ``transformers`` places new
    tokens (position ids, input slicing when ``generate()`` continues a cache) from the length of
    the whole sequence, while ``get_seq_length(layer_idx)`` and the per-layer mask sizes keep each
    layer's real length.
    """
    if removed == 0:
        return
    ref = weakref.ref(cache)

    def get_seq_length(layer_idx: int | None = None) -> int:
        owner = ref()
        if owner is None:  # it lives on the cache and is reached through it: the cache is alive
            raise ReferenceError("the cache whose length this reports is gone")
        real = type(owner).get_seq_length
        if layer_idx is None:
            held = real(owner, 0)
            return held + removed if held else 0
        return real(owner, layer_idx)

    cache.get_seq_length = get_seq_length  # type: ignore[method-assign]  # this instance only, by design


def forget_logical_length(cache: Cache) -> None:
    """Undo :func:`report_logical_length` (a cache emptied and filled again by another prefill)."""
    cache.__dict__.pop("get_seq_length", None)
