"""``vlm_reroute.pipeline``: a model, its processor and a method in one call (the kvpress habit).

::

    pipe = vlm_reroute.pipeline("llava-hf/llava-1.5-7b-hf", method="pdrop+reroute", ratio=0.111)
    answer = pipe("examples/street.png", "Where is the man in the red shirt?")
    answer.text, answer.decisions, answer.trace

The pipeline loads the checkpoint and its processor, writes the prompt in the checkpoint's chat
format with one placeholder per image, handles the family's quirks (Qwen without torchvision:
inputs assembled from the tokenizer and image processor, see :mod:`vlm_reroute.loading`) and runs
greedy ``generate`` inside the method's block. A budget (``tier`` = avg_T, ``ratio``,
``flops_fraction``) is solved per prompt for each image's token count. The module is named
``pipelines`` so that the function ``vlm_reroute.pipeline`` is never shadowed by a submodule of the
same name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from .adapters import adapter_for
from .engine.trace import Trace
from .images import ImageLike, load_image
from .loading import PromptBuilder, load_model, quiet_transformers, resolve_source
from .methods import MethodSpec, TokenReduction

__all__ = ["Answer", "Pipeline", "pipeline"]

Images = ImageLike | Sequence[ImageLike]
#: the ``method=`` of a call that means "the pipeline's own method"
Default = Literal["default"]


@dataclass
class Answer:
    """One prompt's answer and what the method did to it.

    ``trace`` covers the whole batch the prompt ran in (``None`` without a method); ``sample`` is
    this prompt's row in it. ``visual_tokens`` lists the visual tokens of each of its images.
    :attr:`avg_visual_tokens` is avg_T, the budget measure of the published tables (docs/budgets.md).
    """

    text: str
    visual_tokens: list[int]
    token_ids: list[int]
    trace: Trace | None = None
    sample: int = 0
    num_layers: int = 0

    @property
    def decisions(self) -> list[dict[str, int]]:
        """Per decision layer: visual tokens kept (all images of this prompt) and re-entered."""
        if self.trace is None:
            return []
        return [
            {"layer": d.layer, "kept": d.kept[self.sample], "reentered": d.reentered[self.sample]}
            for d in self.trace.decisions
        ]

    @property
    def avg_visual_tokens(self) -> float:
        """Mean visual tokens per decoder layer (avg_T) in this prompt's prefill."""
        if self.trace is None or not self.trace.decisions:
            return float(sum(self.visual_tokens))
        counts = self.trace.tokens_per_layer(self.num_layers, self.sample)
        return sum(counts) / len(counts)


@dataclass
class Pipeline:
    """A loaded model, its prompt builder and an optional method; call it with images and a question.

    It exists so that one call loads, prompts, routes and answers (the kvpress habit), with the
    same prompt builder and budget solving as the command line.
    """

    model: Any
    builder: PromptBuilder
    method: TokenReduction | None = None
    generate_kwargs: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 64})

    def __call__(
        self,
        images: Images,
        question: str,
        method: TokenReduction | None | Default = "default",
        **generate_kwargs: Any,
    ) -> Answer:
        """Answer ``question`` about one image or several (paths, URLs or PIL images); ``method=None``
        runs the model untouched, another method object overrides the pipeline's for this call."""
        return self.batch([(images, question)], method, **generate_kwargs)[0]

    def inputs(self, samples: Sequence[tuple[Images, str]]) -> dict[str, Any]:
        """Model inputs for ``(images, question)`` pairs, padded on the left."""
        loaded = [([load_image(i) for i in _image_list(images)], question) for images, question in samples]
        return self.builder.batch(loaded, self.model)

    def batch(
        self,
        samples: Sequence[tuple[Images, str]],
        method: TokenReduction | None | Default = "default",
        **generate_kwargs: Any,
    ) -> list[Answer]:
        """Answer several prompts in one batch; ``method=None`` runs the model untouched."""
        return self.generate(self.inputs(samples), method, **generate_kwargs)

    def generate(
        self,
        inputs: dict[str, Any],
        method: TokenReduction | None | Default = "default",
        **generate_kwargs: Any,
    ) -> list[Answer]:
        """Greedy answers for prepared ``inputs`` (see :meth:`inputs`) under ``method``."""
        chosen = self.method if isinstance(method, str) and method == "default" else method
        kwargs = {"do_sample": False, **self.generate_kwargs, **generate_kwargs}
        if self.model.generation_config.pad_token_id is None and "pad_token_id" not in kwargs:
            kwargs["pad_token_id"] = self.builder.tokenizer.pad_token_id
        prompt_len = inputs["input_ids"].shape[1]
        with torch.no_grad(), chosen(self.model) if chosen is not None else nullcontext() as trace:
            out = self.model.generate(**inputs, **kwargs)
        counts = visual_tokens_per_image(self.model, inputs)
        num_layers = len(adapter_for(self.model).layers)
        return [
            Answer(
                text=self.builder.decode(row[prompt_len:]),
                visual_tokens=counts[b],
                token_ids=row[prompt_len:].tolist(),
                trace=trace,
                sample=b,
                num_layers=num_layers,
            )
            for b, row in enumerate(out)
        ]

    def __repr__(self) -> str:
        name = getattr(self.model, "name_or_path", type(self.model).__name__)
        return f"Pipeline({name!r}, method={self.method!r})"


def _image_list(images: Images) -> list[ImageLike]:
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    return list(images)


def visual_tokens_per_image(model: Any, inputs: dict[str, Any]) -> list[list[int]]:
    """Per sample, the visual tokens of each of its images (in prompt order), as the adapter sees them."""
    adapter = adapter_for(model)
    ids = inputs["input_ids"]
    image_ids = adapter.image_ids(ids, {k: v for k, v in inputs.items() if k != "input_ids"})
    out = []
    for row in image_ids:
        present = row[row >= 0]
        out.append(
            torch.unique_consecutive(present, return_counts=True)[1].tolist() if present.numel() else []
        )
    return out


def pipeline(
    model: str | os.PathLike | Any,
    method: str | MethodSpec | TokenReduction | None = None,
    *,
    reroute: bool = False,
    tier: float | None = None,
    ratio: float | None = None,
    flops_fraction: float | None = None,
    strict: bool = False,
    layers: Sequence[int] | None = None,
    keep: Sequence[int | float] | None = None,
    processor: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "auto",
    attn: str = "sdpa",
    max_new_tokens: int = 64,
    **settings: Any,
) -> Pipeline:
    """A :class:`Pipeline` for ``model`` (Hub id, local folder or a loaded model) and ``method``.

        ``method``: ``None`` (vanilla), a method object (``PDrop(...)``), a
        :class:`~vlm_reroute.methods.spec.MethodSpec`, or a registered name (``"fastv"``, ``"pdrop"``,
        ``"pdrop+reroute"``, ...) read by :meth:`MethodSpec.parse` with ``reroute``, one budget
        (``tier`` = avg_T, ``ratio`` of visual tokens kept on average, ``flops_fraction``; ``strict``
        makes an unreachable budget an error instead of a clamp) or an explicit ``layers``/``keep``
        schedule, and ``settings`` (e.g. ``seed=`` for ``"random"``); a name is checked before the
        model loads. ``processor``: where to load the processor from when ``model`` is an already
        loaded model (default: its ``name_or_path``). Loading problems raise
        :class:`~vlm_reroute.loading.LoadError`;
    the libraries' loading bars and expected notices are silenced while loading.
    """
    spec = {"tier": tier, "ratio": ratio, "flops_fraction": flops_fraction, "layers": layers, "keep": keep}
    given: dict[str, Any] = {k: v for k, v in spec.items() if v is not None}
    if isinstance(method, str):
        method = MethodSpec.parse(method, reroute=reroute, strict=strict, **given, **settings)
    elif not (method is None or isinstance(method, MethodSpec | TokenReduction)):
        raise TypeError(f"pipeline(method={method!r}): give None, a method name or a method object")
    elif given or settings:
        raise ValueError(
            f"pipeline(method={method!r}) with {', '.join({**given, **settings})}: budgets and settings "
            "build a method from its name (method='pdrop', ...); a method object carries its own"
        )
    with quiet_transformers():  # the expected torchvision fallback notices and loading bars
        if isinstance(model, str | os.PathLike):
            name = os.fspath(model)
            source = resolve_source(name)
            loaded = load_model(name, dtype=dtype, device=device, attn=attn, source=source)
            builder = PromptBuilder.from_pretrained(name, loaded, source)
        else:
            loaded = model
            name = os.fspath(processor) if processor is not None else getattr(model, "name_or_path", "")
            builder = PromptBuilder.from_pretrained(name, loaded)
    chosen = method.build(loaded) if isinstance(method, MethodSpec) else method
    if chosen is not None:
        adapter_for(loaded)  # refuse an unsupported model now, not at the first call
    return Pipeline(loaded, builder, chosen, {"max_new_tokens": max_new_tokens})
