"""What the engine needs to know about a model family, and nothing more.

An adapter finds the decoder and its layers, marks the visual tokens of a prompt, tells which
image each belongs to and how each image is laid out (grid, crops, extra tokens), and projects
queries and keys for scoring with the family's own modules (norms, projections, q/k norms,
rotary embedding). Everything else (gather, scatter, masks, cache) is shared by the executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..kinds import ScoreFrom
from .layout import ImageLayout, single_view_layouts

if TYPE_CHECKING:
    from .vision import VisionTap


def by_name(module: nn.Module) -> Any:
    """``module``, its submodules and settings read by name (``by_name(layer).self_attn.head_dim``).

    ``nn.Module`` types every attribute it does not declare as ``Tensor | Module`` (its ``__getattr__``),
    and which one a family's ``self_attn`` or ``visual`` is, no annotation can say: the one place the
    package says "the family's own modules, as transformers defines them" instead of casting per line."""
    return module


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelAdapter(ABC):
    """Base adapter for ``*ForConditionalGeneration`` models with a Llama-style decoder."""

    #: Class names of the models this adapter accepts.
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def config(self) -> Any:
        """The checkpoint's config (its fields differ per family, so they are read by name)."""
        return self.model.config

    @property
    def inner(self) -> Any:
        """``model.model``: the family's base model (towers, projector, language model), read by name."""
        return self.model.model

    @property
    def decoder(self) -> nn.Module:
        """The text decoder (holds ``layers``, ``rotary_emb`` and ``config``)."""
        return self.inner.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return by_name(self.decoder).layers

    @property
    def text_config(self) -> Any:
        return self.decoder.config

    @property
    def final_norm(self) -> nn.Module:
        """The decoder's final norm (before the LM head): DART (arXiv 2502.11494) compares tokens
        through it."""
        return by_name(self.decoder).norm

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``(B, N)``: positions that hold image features."""
        return input_ids == self.image_token_id

    def visual_mask_from_types(self, model_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Bool ``(B, N)`` image positions from ``mm_token_type_ids`` (1 on image tokens, as the
        processors return it), or None when the call has none: how a call with ``inputs_embeds``
        and no ``input_ids`` is located."""
        types = model_kwargs.get("mm_token_type_ids")
        return types == 1 if types is not None else None

    @abstractmethod
    def image_ids(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Long ``(B, N)``: global image index (counted over the batch in sample order) per visual
        token, ``-1`` elsewhere. Each image is routed with its own keep count."""

    @abstractmethod
    def image_grids(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        """Rows × cols (after merging) of every image, by global image index."""

    def image_layouts(self, image_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[ImageLayout]]:
        """Per sample, per image: span, grid and offsets (see :class:`ImageLayout`)."""
        return single_view_layouts(image_ids, self.image_grids(image_ids, model_kwargs))

    def vision_tap(self) -> VisionTap | None:
        """The tower's stage-1 signals as a :class:`~.vision.VisionTap` (salience and keys per token,
        rows written back), or None when the family provides none (``adapters/vision.py``)."""
        return None

    def fixed_grid(self) -> tuple[int, int] | None:
        """The grid every image has whatever its size (LLaVA-1.5's patch grid), or None when the grid
        depends on the image: lets a method check a budget against the grid before any image arrives."""
        return None

    # ---- prompts without the checkpoint's processor (``prompting.family_inputs``) ---------------
    #: Model classes whose inputs :meth:`expand_images` rebuilds (their processors own a video
    #: processor, which needs torchvision; the other families' processors load without it).
    prompt_classes: tuple[str, ...] = ()
    #: The family's processor also returns ``mm_token_type_ids`` (1 on image tokens).
    token_type_ids: bool = False

    def expand_images(
        self, tokenizer: Any, image_processor: Any, images: Sequence[Sequence[Any]], placeholder: str
    ) -> tuple[dict[str, Any], list[str]]:
        """What the family's processor does with the images of a batch (``images[b]``: prompt ``b``'s,
        at least one image in all): the image processor's outputs, and per image in order the text its
        ``placeholder`` becomes in the prompt."""
        raise NotImplementedError(f"{type(self.model).__name__}: prompts are built by its own processor")

    # ---- pictures (``viz.geometry``): how the family's image processors place pixels ----------------
    #: Image-processor class name (without its ``Fast`` / ``Pil`` suffix) -> how it maps the picture to
    #: the single grid: ``"resize_crop"`` (resize, optional centre crop), ``"pad_resize_crop"`` (the same
    #: after a pad to a square), ``"smart_resize"`` (resize to a multiple of the merged patch; the grid
    #: covers the whole picture). Families whose layouts have several views declare none.
    image_placements: ClassVar[Mapping[str, str]] = {}

    # ---- hybrid decoders (Qwen3.5): where decisions may be scored, which layers are recurrent -----
    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Layers without attention (linear attention / recurrent): a 2-D padding mask, no KV cache."""
        return ()

    @property
    def length_layer(self) -> int:
        """The layer whose cache length ``Cache.get_seq_length()`` (no argument) reports."""
        return 0

    def allowed_decision_layers(self, score_from: ScoreFrom = ScoreFrom.CURRENT) -> tuple[int, ...]:
        """Layers a decision may be made at (every layer but the first, unless the family says otherwise)."""
        return tuple(range(1, len(self.layers)))

    def check_plan(self, layers: tuple[int, ...], score_from: ScoreFrom) -> None:
        """Refuse decision layers the family cannot score at (a clear error listing the allowed ones)."""
        allowed = self.allowed_decision_layers(score_from)
        bad = [layer for layer in layers if layer not in allowed]
        if bad:
            raise ValueError(
                f"decision layers {bad} are not allowed on {type(self.model).__name__}; the allowed "
                f"decision layers are {list(allowed)}"
            )

    # ---- inputs the decoder adds after some layers (Qwen3-VL's DeepStack) -----------------------
    @property
    def addition_layers(self) -> tuple[int, ...]:
        """Layers after which :meth:`take_layer_additions` may add rows (hooks are installed on them only)."""
        return ()

    def take_layer_additions(
        self, decoder_kwargs: dict[str, Any]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Take out of a routed prefill's decoder inputs what the decoder would add to the full sequence
        after some layers, and return it as ``{layer: (mask (B, N) bool, rows (mask.sum(), D))}``: the
        executor adds row ``k`` to the ``k``-th masked token (row-major) after ``layer``, if that token
        ran the layer. ``decoder_kwargs`` is edited in place so the decoder does not add them too."""
        return {}

    # ---- scoring: queries and keys from the layer's own modules --------------------------------
    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``(B, T, heads, head_dim)`` in place with ``cos``/``sin`` ``(B, T, head_dim)``.

        ``x`` is a fresh projection the scorer owns, so it is overwritten rather than copied. The
        supported families fold MRoPE's axes into ``cos``/``sin`` inside their rotary module, so
        one formula serves 1-D RoPE and MRoPE alike.
        """
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        rotated = rotate_half(x)
        return x.mul_(cos).addcmul_(rotated, sin)

    def project_queries(
        self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Queries ``(B, T, heads, head_dim)`` of ``hidden`` entering ``layer``, rotated and scaled."""
        attn = by_name(layer).self_attn
        return self._project(layer, attn.q_proj, getattr(attn, "q_norm", None), hidden, cos, sin).mul_(
            attn.scaling
        )

    def project_keys(
        self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Keys ``(B, T, kv_heads, head_dim)`` of ``hidden`` entering ``layer``, rotated."""
        attn = by_name(layer).self_attn
        return self._project(layer, attn.k_proj, getattr(attn, "k_norm", None), hidden, cos, sin)

    def _project(
        self,
        layer: nn.Module,
        proj: nn.Module,
        norm: nn.Module | None,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """The layer's input norm, one projection split into heads, its per-head norm (q_norm /
        k_norm where the family has one, as Qwen3 does), then the rotary embedding."""
        batch, n = hidden.shape[:2]
        modules = by_name(layer)
        x = proj(modules.input_layernorm(hidden)).view(batch, n, -1, modules.self_attn.head_dim)
        if norm is not None:
            x = norm(x)
        return self.apply_rope(x, cos, sin)

    def check(self) -> None:
        """Refuse configurations the executor cannot route exactly."""
        cfg = self.text_config
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"{type(self.model).__name__} has layer types {sorted(set(layer_types))}; "
                "vlm-reroute routes only decoders whose layers are all 'full_attention'"
            )
