"""What the float64 reference (``fuzz_reference.py``) takes from a model: the decoder's input
(merged embeddings, position ids, DeepStack rows, captured at the decoder), and the weights,
RMSNorm epsilons, RoPE tables and layer types, read into plain float64 tensors.

Split from ``fuzz_reference.py`` so each file holds one concept: this one reads the model, that
one computes the routed decoder from what is read here. It shares no code with ``vlm_reroute``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _Captured(Exception):
    """Raised by the capture hook to stop the model right at the decoder's input."""


# ---------------------------------------------------------------------------------------------
# What the model provides: embeddings, position ids, DeepStack rows, weights
# ---------------------------------------------------------------------------------------------
def decoder_of(model):
    """The language model: ``model.model.text_model`` (Idefics3, SmolVLM) or ``.language_model``."""
    inner = model.model
    return inner.text_model if hasattr(inner, "text_model") else inner.language_model


@dataclass
class Prompt:
    """One sample without its padding: ``embeds`` ``(n, D)``, ``positions`` ``(axes, n)`` (1 or 3
    axes), ``visual`` ``(n,)`` bool, ``image`` ``(n,)`` image number (-1 off images) and
    ``deepstack``: per DeepStack level, one row ``(D,)`` per visual token of the sample, in order."""

    embeds: Tensor
    positions: Tensor
    visual: Tensor
    image: Tensor
    padding: int  # left padding removed from the batch row
    deepstack: list[Tensor]


def capture_prompts(
    model, inputs: dict, image_sizes: list[list[int]], generate: bool = False
) -> list[Prompt]:
    """Merged embeddings, position ids and DeepStack rows as the model hands them to its decoder,
    split per sample.

    ``generate=True`` captures the prefill of ``model.generate`` (its position ids come from the
    attention mask, unlike a plain forward). ``image_sizes[b]``: token count of each image of
    sample ``b`` in sequence order (the visual tokens are split into images by these counts).
    """
    decoder = decoder_of(model)
    got: dict = {}

    def grab(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"].detach()
        got["positions"] = kwargs.get("position_ids")
        got["deepstack"] = kwargs.get("deepstack_visual_embeds")
        got["deepstack_mask"] = kwargs.get("visual_pos_masks")
        raise _Captured

    handle = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        if generate:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        else:
            model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    embeds = got["embeds"]
    batch, n = embeds.shape[:2]
    pos = got["positions"]
    if pos is None:
        pos = torch.arange(n)[None, None].expand(1, batch, n)
    elif pos.ndim == 2:
        pos = pos[None]
    elif pos.shape[0] == 4:  # Qwen: text positions first, then the 3 MRoPE axes
        pos = pos[1:]
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    image_token = int(model.config.image_token_id)
    # DeepStack rows go to the True positions of the (B, S) mask in row-major order: sample b's rows
    # follow those of the samples before it
    levels, ds_mask = got["deepstack"] or [], got["deepstack_mask"]
    first_row = [0] * (batch + 1)
    if levels:
        first_row = [0, *ds_mask.sum(dim=1).cumsum(0).tolist()]
    prompts = []
    for b in range(batch):
        keep = valid[b]
        visual = ids[b][keep] == image_token
        image = torch.full((int(keep.sum()),), -1, dtype=torch.long)
        sizes = image_sizes[b]
        if int(visual.sum()) != sum(sizes):
            raise ValueError(f"sample {b}: {int(visual.sum())} image tokens, image sizes {sizes}")
        image[visual] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        if levels and not torch.equal(ds_mask[b][keep], visual):
            raise ValueError(f"sample {b}: the DeepStack mask is not the image-token mask")
        rows = [level[first_row[b] : first_row[b + 1]].detach().to(F64) for level in levels]
        prompts.append(
            Prompt(
                embeds=embeds[b][keep].to(F64),
                positions=pos[:, b][:, keep].long(),
                visual=visual,
                image=image,
                padding=int((~keep).sum()),
                deepstack=rows,
            )
        )
    return prompts


@dataclass
class AttentionWeights:
    """A softmax-attention mixer. ``q`` gives ``heads·head_dim`` (or, gated, query and gate per head:
    ``heads·2·head_dim``); ``q_norm`` / ``k_norm`` are per-head RMSNorm weights or None."""

    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    q_norm: Tensor | None
    k_norm: Tensor | None
    qk_eps: float
    gated: bool


@dataclass
class LinearWeights:
    """A Gated DeltaNet mixer (Qwen3.5's linear attention)."""

    qkv: Tensor
    z: Tensor
    b: Tensor
    a: Tensor
    conv: Tensor  # (channels, kernel): depthwise, causal
    a_log: Tensor
    dt_bias: Tensor
    norm: Tensor
    norm_eps: float
    out: Tensor
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int


@dataclass
class MlpWeights:
    """SwiGLU; ``experts`` (E, 2I, D) / ``expert_down`` (E, D, I) with a ``router`` for a MoE block."""

    gate: Tensor | None = None
    up: Tensor | None = None
    down: Tensor | None = None
    router: Tensor | None = None
    experts: Tensor | None = None
    expert_down: Tensor | None = None
    top_k: int = 0


@dataclass
class LayerWeights:
    ln1: Tensor
    eps1: float
    mixer: AttentionWeights | LinearWeights
    ln2: Tensor
    eps2: float
    mlp: MlpWeights

    @property
    def linear(self) -> bool:
        return isinstance(self.mixer, LinearWeights)


def _linear_weights(module) -> tuple[Tensor, Tensor | None]:
    bias = module.bias.detach().to(F64) if module.bias is not None else None
    return module.weight.detach().to(F64), bias


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", None)))


def _w(param) -> Tensor:
    return param.detach().to(F64)


def _mlp(mlp) -> MlpWeights:
    if hasattr(mlp, "experts"):  # Qwen3-VL-MoE sparse block: router + stacked experts
        return MlpWeights(
            router=_w(mlp.gate.weight),
            experts=_w(mlp.experts.gate_up_proj),
            expert_down=_w(mlp.experts.down_proj),
            top_k=int(mlp.gate.top_k),
        )
    return MlpWeights(gate=_w(mlp.gate_proj.weight), up=_w(mlp.up_proj.weight), down=_w(mlp.down_proj.weight))


def _attention(attn, gated: bool) -> AttentionWeights:
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    return AttentionWeights(
        q=_linear_weights(attn.q_proj),
        k=_linear_weights(attn.k_proj),
        v=_linear_weights(attn.v_proj),
        o=_linear_weights(attn.o_proj),
        q_norm=_w(q_norm.weight) if q_norm is not None else None,
        k_norm=_w(k_norm.weight) if k_norm is not None else None,
        qk_eps=_eps(q_norm) if q_norm is not None else 0.0,
        gated=gated,
    )


def _linear_attention(mixer) -> LinearWeights:
    return LinearWeights(
        qkv=_w(mixer.in_proj_qkv.weight),
        z=_w(mixer.in_proj_z.weight),
        b=_w(mixer.in_proj_b.weight),
        a=_w(mixer.in_proj_a.weight),
        conv=_w(mixer.conv1d.weight)[:, 0],
        a_log=_w(mixer.A_log),
        dt_bias=_w(mixer.dt_bias),
        norm=_w(mixer.norm.weight),
        norm_eps=_eps(mixer.norm),
        out=_w(mixer.out_proj.weight),
        k_heads=mixer.num_k_heads,
        v_heads=mixer.num_v_heads,
        k_dim=mixer.head_k_dim,
        v_dim=mixer.head_v_dim,
    )


INTERLEAVED_MROPE = ("qwen3_vl_text", "qwen3_vl_moe_text", "qwen3_5_text")
ZERO_CENTRED_NORMS = ("qwen3_5_text",)
GATED_QUERY = ("qwen3_5_text",)


@dataclass
class Weights:
    """Every decoder weight in float64, plus the attention and rotary geometry."""

    layers: list[LayerWeights]
    norm: Tensor
    norm_eps: float
    head: Tensor
    embed: Tensor
    heads: int
    kv_heads: int
    head_dim: int
    inv_freq: Tensor  # (rotary_dim / 2,)
    axis_of_freq: Tensor  # (rotary_dim / 2,): which position axis drives each frequency
    zero_centred: bool = False  # RMSNorm scales by (1 + w)

    @classmethod
    def of(cls, model) -> Weights:
        decoder = decoder_of(model)
        cfg = decoder.config
        kind = cfg.model_type
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r}: the reference implements SwiGLU (silu)")
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type={rope.get('rope_type')!r}: the reference implements 'default'")
        layers = []
        for layer in decoder.layers:
            if hasattr(layer, "linear_attn"):
                mixer = _linear_attention(layer.linear_attn)
            else:
                mixer = _attention(layer.self_attn, gated=kind in GATED_QUERY)
            layers.append(
                LayerWeights(
                    ln1=_w(layer.input_layernorm.weight),
                    eps1=_eps(layer.input_layernorm),
                    mixer=mixer,
                    ln2=_w(layer.post_attention_layernorm.weight),
                    eps2=_eps(layer.post_attention_layernorm),
                    mlp=_mlp(layer.mlp),
                )
            )
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        inv_freq = decoder.rotary_emb.inv_freq.detach().to(F64)
        half = inv_freq.numel()  # rotary dims / 2 (all of head_dim but for partial RoPE)
        section = rope.get("mrope_section")
        if section is None:  # 1-D RoPE: every frequency follows the single position axis
            axis = torch.zeros(half, dtype=torch.long)
        elif kind in INTERLEAVED_MROPE:  # t by default; h on j ≡ 1, w on j ≡ 2 (mod 3) within 3·section
            axis = torch.zeros(half, dtype=torch.long)
            for j in range(half):
                for a in (1, 2):
                    if j % 3 == a and j < 3 * section[a]:
                        axis[j] = a
        else:  # Qwen2-VL MRoPE: consecutive frequency chunks follow the t, h, w axes in turn
            if sum(section) != half:
                raise ValueError(f"mrope_section={section} does not cover the {half} rotary frequencies")
            axis = torch.repeat_interleave(torch.arange(len(section)) % 3, torch.tensor(section))
        return cls(
            layers=layers,
            norm=_w(decoder.norm.weight),
            norm_eps=_eps(decoder.norm),
            head=_w(model.lm_head.weight),
            embed=_w(decoder.embed_tokens.weight),
            heads=heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            inv_freq=inv_freq,
            axis_of_freq=axis,
            zero_centred=kind in ZERO_CENTRED_NORMS,
        )

    def rms(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """The family's RMSNorm: ``w·x̂`` or, zero-centred, ``(1 + w)·x̂``."""
        return rms_norm(x, 1.0 + weight if self.zero_centred else weight, eps)
