"""DART's duplication-aware set selection (arXiv 2502.11494, §3.3), vectorised over images.

DART keeps tokens that are *not* duplicates of a few pivots: pivots are the tokens with the
largest key norm (image pivots among the candidates, text pivots among the text after the image),
and each pivot retains the candidates least cosine-similar to it. The published code
(``get_retained_image_token`` in the DART fork and LightCompress's ``dart.py``; ``methods.md`` §3.2)
takes ``⌊T/8⌋`` tokens per pivot in the order of a Python ``set``; here the count is exact and
deterministic: the ``k - image pivots`` picks are spread as evenly as possible over the pivots,
the pivots processed in descending key-norm order (the first ``r mod P`` pivots take one more).

Everything is batched over the images of the batch (a ``(G, M)`` packed view, ``G`` images of at
most ``M`` tokens); the only Python loop is over the pivots (8 by default). Memory is linear in the
sequence: ``G·M·D`` features and ``G·P·M`` cosines, no token × token matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kinds import Choice, ScoreFrom
from .base import ScoringContext


class DartFeatures(Choice):
    """Which states DART's cosines compare (``features=``): the reference uses the model's final
    norm; the decision layer's input norm and the raw residual stream are options (measured for
    stale deferred states, ``docs/methods.md``)."""

    FINAL_NORM = "final_norm"
    LAYER_NORM = "layer_norm"
    HIDDEN = "hidden"


DART_FEATURES = tuple(DartFeatures)


@dataclass(frozen=True)
class DartSelector:
    """Exactly ``counts[g]`` tokens of every image ``g``: its top ``image_pivots`` candidates by key
    L1 norm, then per pivot (image and ``text_pivots`` text pivots, by descending key norm) the
    quota of remaining candidates with the lowest cosine to it. A :class:`~.base.Selector`."""

    image_pivots: int = 4
    text_pivots: int = 4
    features: DartFeatures = DartFeatures.FINAL_NORM
    score_from: ScoreFrom = ScoreFrom.CURRENT

    def __post_init__(self) -> None:
        for name, low in (("image_pivots", 1), ("text_pivots", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DartSelector({name}={value!r}): allowed is an int ≥ {low}")
        features, score_from = DartFeatures.of(self.features), ScoreFrom.of(self.score_from)
        if features is None:
            raise ValueError(
                f"DartSelector(features={self.features!r}): allowed are {', '.join(DART_FEATURES)}"
            )
        if score_from is None:
            raise ValueError(
                f"DartSelector(score_from={self.score_from!r}): allowed are 'current' and 'previous'"
            )
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "score_from", score_from)

    # ---- per-token signals --------------------------------------------------------------------
    def key_norms(self, ctx: ScoringContext) -> torch.Tensor:
        """L1 norm ``(B, N)`` of every token's key at the scoring layer, all KV heads together: input
        norm, ``k_proj`` and k-norm of the carried state (deferred tokens too, as the attention scorer
        builds their keys), **before** RoPE. The reference reads post-RoPE keys; the L1 norm of a
        rotated key depends on the absolute position, so a left-padded sample would pick other pivots
        than the same sample alone (RoPE preserves only the L2 norm of each pair)."""
        n = ctx.visual.shape[1]
        cos, _ = ctx.rope
        identity = (torch.ones_like(cos[:, :n]), torch.zeros_like(cos[:, :n]))  # RoPE by angle 0
        keys = ctx.adapter.project_keys(ctx.layer, ctx.hidden[:, :n], *identity)
        return keys.float().abs().sum(dim=(2, 3))

    def unit_features(self, ctx: ScoringContext) -> torch.Tensor:
        """Unit-length ``(B, N, D)`` float32 states the cosines compare."""
        hidden = ctx.hidden[:, : ctx.visual.shape[1]]
        if self.features is DartFeatures.FINAL_NORM:
            hidden = ctx.adapter.final_norm(hidden)
        elif self.features is DartFeatures.LAYER_NORM:
            norm: Any = ctx.layer.input_layernorm  # a submodule (nn.Module.__getattr__ says Tensor | Module)
            hidden = norm(hidden)
        return torch.nn.functional.normalize(hidden.float(), dim=-1)

    # ---- the set ------------------------------------------------------------------------------
    def select(self, ctx: ScoringContext, counts: torch.Tensor) -> torch.Tensor:
        norms, feats = self.key_norms(ctx), self.unit_features(ctx)
        packed = _Packed(ctx, counts.numel())
        cand = packed.take(ctx.candidates, False)
        cand_norm = torch.where(cand, packed.take(norms, 0.0), float("-inf"))
        feat = packed.take(feats, 0.0)  # (G, M, D)
        # image pivots: the top min(image_pivots, k) candidates by key norm (ties: earlier token)
        take = min(self.image_pivots, packed.width)
        n_img = counts.clamp(max=self.image_pivots)
        img_idx = cand_norm.argsort(dim=1, descending=True, stable=True)[:, :take]
        img_ok = torch.arange(take, device=counts.device) < n_img[:, None]
        is_pivot = torch.zeros_like(cand).scatter_(1, img_idx, img_ok)
        # text pivots: the top text_pivots text tokens after the image, same norm
        txt_idx, txt_ok = self._text_pivots(ctx, packed, norms)
        piv_norm = torch.cat([cand_norm.gather(1, img_idx), norms[packed.sample[:, None], txt_idx]], dim=1)
        piv_ok = torch.cat([img_ok, txt_ok], dim=1)
        piv_feat = torch.cat(
            [feat[packed.arange[:, None], img_idx], feats[packed.sample[:, None], txt_idx]], 1
        )
        order = torch.where(piv_ok, piv_norm, float("-inf")).argsort(dim=1, descending=True, stable=True)
        piv_ok, piv_feat = piv_ok.gather(1, order), piv_feat[packed.arange[:, None], order]
        quotas = _quotas(counts - n_img, piv_ok)
        cosine = torch.einsum("gpd,gmd->gpm", piv_feat, feat)  # (G, P, M)
        chosen, pool = is_pivot, cand & ~is_pivot
        slots = torch.arange(packed.width, device=counts.device).expand_as(pool)
        for j in range(quotas.shape[1]):  # a loop over the pivots (8), never over tokens
            ranked = torch.where(pool, cosine[:, j], float("inf")).argsort(dim=1, stable=True)
            rank = torch.empty_like(ranked).scatter_(1, ranked, slots)
            pick = pool & (rank < quotas[:, j : j + 1])
            chosen, pool = chosen | pick, pool & ~pick
        return packed.unpack(chosen)

    def _text_pivots(
        self, ctx: ScoringContext, packed: _Packed, norms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: positions ``(G, text_pivots)`` of the highest-key-norm text tokens after its last
        token in its sample, and which of them exist."""
        n = ctx.visual.shape[1]
        text = ctx.valid[:, :n] & ~ctx.visual
        after = torch.arange(n, device=norms.device)[None, :] > packed.end[:, None]
        mask = text[packed.sample] & after  # (G, N)
        ranked = torch.where(mask, norms[packed.sample], float("-inf"))
        idx = ranked.argsort(dim=1, descending=True, stable=True)[:, : min(self.text_pivots, n)]
        return idx, mask.gather(1, idx)


def _quotas(remaining: torch.Tensor, pivot_ok: torch.Tensor) -> torch.Tensor:
    """``(G, P)`` picks per pivot: ``remaining`` spread evenly over each image's existing pivots, the
    first ``remaining mod P`` (in processing order, existing pivots first) taking one more."""
    n_piv = pivot_ok.sum(dim=1).clamp(min=1)
    base, extra = remaining // n_piv, remaining % n_piv
    j = torch.arange(pivot_ok.shape[1], device=remaining.device)[None, :]
    return torch.where(pivot_ok, base[:, None] + (j < extra[:, None]).long(), 0)


class _Packed:
    """The visual tokens of a batch as ``(G, M)`` rows, one per image (images in ``image_ids`` order,
    tokens in sequence order, right-padded)."""

    def __init__(self, ctx: ScoringContext, n_images: int) -> None:
        self.rows, self.cols = ctx.visual.nonzero(as_tuple=True)  # row-major: grouped by image
        self.group = ctx.image_ids[self.rows, self.cols]
        sizes = torch.bincount(self.group, minlength=n_images)
        self.rank = (
            torch.arange(self.group.numel(), device=sizes.device) - (sizes.cumsum(0) - sizes)[self.group]
        )
        self.width = max(int(sizes.max()), 1) if n_images else 1
        self.shape = ctx.visual.shape
        self.arange = torch.arange(n_images, device=sizes.device)
        self.sample = torch.zeros(n_images, dtype=torch.long, device=sizes.device).scatter_(
            0, self.group, self.rows
        )
        self.end = torch.zeros_like(self.sample).scatter_reduce(0, self.group, self.cols, "amax")

    def take(self, values: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """``(B, N, ...)`` values of the visual tokens as ``(G, M, ...)``, ``fill`` in the padding."""
        out = values.new_full((self.arange.numel(), self.width, *values.shape[2:]), fill)
        out[self.group, self.rank] = values[self.rows, self.cols]
        return out

    def unpack(self, chosen: torch.Tensor) -> torch.Tensor:
        """``(G, M)`` bool back to ``(B, N)``."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=chosen.device)
        out[self.rows, self.cols] = chosen[self.group, self.rank]
        return out
