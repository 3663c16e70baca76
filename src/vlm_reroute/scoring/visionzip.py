"""VisionZip's token selection and merging (Yang et al., CVPR 2025, arXiv 2412.04467).

Per image (``methods.md`` §4, the reference ``visionzip/utils.py`` formulas):

* **dominant** tokens: the ``D`` tokens of highest salience (the vision tower's [CLS] attention
  summed over heads, or the substitute a tower without [CLS] provides);
* **contextual** tokens: among the remaining ``R = N − D`` tokens (ascending index), ``C`` targets at
  the uniform stride ``max(1, ⌊R / C⌋)`` (``arange(0, R, stride)[:C]``); every other remaining token
  is assigned to the target whose key is most cosine-similar (ties: the first target), and the target
  becomes ``h_target + mean(h_assigned)`` (``h_target`` when none is assigned).

Here ``h`` are the rows the language model receives (after the projector or merger), and a
contextual token sits at its target's position; the reference merges the tower's hidden states
before projecting and appends the contextual tokens after the dominant ones (``docs/methods.md``,
"VisionZip").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ZipResult", "visionzip_select"]


@dataclass(frozen=True)
class ZipResult:
    """``dominant`` and ``targets`` (long, ascending), ``assigned`` ``(R − C,)`` target index of each
    merged token (into ``targets``), ``features`` ``(N, D)``: the rows with the targets rewritten."""

    dominant: torch.Tensor
    targets: torch.Tensor
    assigned: torch.Tensor
    features: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """Long ascending: the tokens that enter the language model (dominant and contextual)."""
        return torch.cat([self.dominant, self.targets]).sort().values


def visionzip_select(
    features: torch.Tensor, salience: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> ZipResult:
    """VisionZip on one image: ``features`` ``(N, D)``, ``salience`` ``(N,)``, ``keys`` ``(N, h)``."""
    n = features.shape[0]
    if dominant < 0 or contextual < 0 or dominant + contextual > n or dominant + contextual == 0:
        raise ValueError(
            f"dominant={dominant}, contextual={contextual}: VisionZip keeps 1..{n} tokens of an image of {n}"
        )
    order = torch.sort(salience.float(), descending=True, stable=True).indices
    top = order[:dominant].sort().values
    rest = order[dominant:].sort().values
    out = features.clone()
    if contextual == 0:
        empty = rest[:0]
        return ZipResult(top, empty, empty, out)
    stride = max(1, rest.numel() // contextual)
    slots = torch.arange(0, rest.numel(), stride, device=rest.device)[:contextual]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_target[slots] = True
    targets, merged = rest[is_target], rest[~is_target]
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    assigned = (unit[merged] @ unit[targets].T).argmax(dim=1)
    h = features.float()
    sums = torch.zeros(targets.numel(), h.shape[1], dtype=torch.float32, device=h.device)
    sums.index_add_(0, assigned, h[merged])
    counts = torch.bincount(assigned, minlength=targets.numel()).clamp_min(1)
    out[targets] = (h[targets] + sums / counts[:, None]).to(features.dtype)
    return ZipResult(top, targets, assigned, out)
