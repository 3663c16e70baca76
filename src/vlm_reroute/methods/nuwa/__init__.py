"""Nüwa (arXiv 2602.02951): stage-1 anchors on the vision side, then stage-2 top-K₂ in the decoder.

One package, one concept per module: ``method`` (the registered dataclass and its budgets),
``signals`` (what the vision tower tells: attention rows, salience), ``aggregate`` (stage 1: anchor
selection and feature aggregation), ``select`` (anchor selection on the patch grid), ``vision`` (the
hooks that run stage 1 while the images are encoded), ``plan`` (K₁, quota and radius per image),
``views`` (stage 1 per view on the multi-view
families, through their vision taps). Specification: ``shared/design/nuwa.md``.
"""

from .method import ImagePlan, Nuwa

__all__ = ["ImagePlan", "Nuwa"]
