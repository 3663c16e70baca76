"""SparseVLM's text raters: the text tokens whose attention rates an image's visual tokens.

SparseVLM (arXiv 2410.04417, §3.2 "text raters"; the release's ``modelling_sparse_llama.py``
@26a5f48 L199–204, ``methods.md`` §3.1 a) picks them once per prompt from the language model's
input embeddings: ``V`` = the image's visual rows, ``Tx`` = every token after the image,
``M = V·Txᵀ`` (raw dot products, no scaling), softmax over the text axis, mean over the visual
axis gives ``r``, and the raters are ``{t : r_t > mean(r)}``.

Library rules where the release is silent (it routes one image of one prompt):

* **several images**: each image gets its own raters, among the *text* tokens (non-visual, not
  padding, inside the prompt) after that image's last visual token; visual tokens of later images
  are not raters. Text between the tiles of one image (Idefics3) is inside the image, not after it.
* **no text after an image** (an image closing the prompt): its rater is the prompt's last token,
  the query row of FastV's rule, so the image is still scored.
* dot products and softmax in float32 (the release computes them in the model's dtype), one
  sample at a time: a sample's raters are the same alone or in any left-padded batch.

Memory: one ``(visual, text)`` matrix per sample (``N·T``, the release's own cost), never
sequence × sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoringContext


@dataclass(frozen=True)
class Raters:
    """The rater rows of every image of a batch.

    ``mask`` ``(n_images, N)`` bool: row ``i`` marks image ``i``'s raters, in its sample's positions
    (images numbered over the batch in sample order, as ``ctx.image_ids`` numbers them); ``sample``
    ``(n_images,)``: the sample each image belongs to.
    """

    mask: torch.Tensor
    sample: torch.Tensor

    def rows(self, batch: int) -> torch.Tensor:
        """Bool ``(B, N)``: every position that rates some image of its sample."""
        union = self.mask.new_zeros(batch, self.mask.shape[1], dtype=torch.float32)
        return union.index_add_(0, self.sample, self.mask.float()) > 0


def text_raters(ctx: ScoringContext) -> Raters:
    """Raters of every image from ``ctx.hidden``, the embeddings entering layer 0 (see the module)."""
    n = ctx.visual.shape[1]
    images = int(ctx.image_ids.max()) + 1 if bool(ctx.visual.any()) else 0
    mask = torch.zeros(images, n, dtype=torch.bool, device=ctx.visual.device)
    sample = torch.zeros(images, dtype=torch.long, device=ctx.visual.device)
    text = ~ctx.visual & ctx.valid[:, :n]
    for b in range(ctx.visual.shape[0]):  # one sample at a time: batch = one by one
        visual = ctx.visual[b].nonzero().flatten()
        if visual.numel() == 0:
            continue
        ids = ctx.image_ids[b, visual]
        first = int(ids.min())
        local = ids - first
        count = int(local.max()) + 1
        sample[first : first + count] = b
        end = torch.full((count,), -1, dtype=torch.long, device=visual.device)
        end = end.scatter_reduce(0, local, visual, reduce="amax")
        words = text[b].nonzero().flatten()
        after = words[None, :] > end[:, None]  # (images, T): the text after each image
        chosen = _raters_of_sample(ctx.hidden[b], visual, local, words, after, count)
        rows = mask[first : first + count]
        rows[:, words] = chosen
        lonely = ~chosen.any(dim=1)  # no text after the image: the prompt's last token rates it
        rows[lonely, ctx.last[b]] = True
    return Raters(mask=mask, sample=sample)


def _raters_of_sample(
    hidden: torch.Tensor,
    visual: torch.Tensor,
    image: torch.Tensor,
    words: torch.Tensor,
    after: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """Bool ``(images, T)``: for each image, the text tokens ``words`` after it with ``r_t > mean(r)``."""
    v = hidden[visual].float()  # (N_v, D)
    t = hidden[words].float()  # (T, D)
    logits = v @ t.T  # (N_v, T): raw dot products (methods.md §3.1 a: no scaling)
    allowed = after[image]  # (N_v, T): each visual row sees the text after its own image
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.where(allowed, logits.softmax(dim=1), 0.0)  # rows with no text after: zeros, not NaN
    sizes = torch.bincount(image, minlength=count).clamp(min=1)
    r = probs.new_zeros(count, words.numel()).index_add_(0, image, probs) / sizes[:, None]  # mean over V
    width = after.sum(dim=1).clamp(min=1)
    mean = (r * after).sum(dim=1) / width  # mean(r) over the image's own text
    return after & (r > mean[:, None])
