"""A plain, slow float64 reference of routed execution, written from the method spec (method.md).

It shares no code with ``vlm_reroute`` (nor with ``tests/reference.py``). From the model it takes
what belongs to the model, not to the method: the merged input embeddings and the model's own
position ids (captured on the decoder's input), the weights, the RMSNorm epsilons, the RoPE
``inv_freq`` buffer and ``mrope_section``. Everything after that is computed here in float64, one
sample at a time with its padding removed (padding is then neither a key nor a query): RMSNorm,
Q/K/V/O projections, RoPE / Qwen MRoPE, GQA, causal attention, SwiGLU MLP, final norm, LM head,
the last-token attention score, per-image top-k, prune / reroute stages, and decoding over each
layer's own cache.

Method: FastV (arXiv 2403.06764), PyramidDrop (arXiv 2410.17247), Reroute (arXiv 2606.12412).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


class _Captured(Exception):
    """Raised by the capture hook to stop the model right at the decoder's input."""


# ---------------------------------------------------------------------------------------------
# What the model provides: embeddings, position ids, weights
# ---------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One sample without its padding: ``embeds`` ``(n, D)``, ``positions`` ``(axes, n)`` (1 or 3
    axes), ``visual`` ``(n,)`` bool and ``image`` ``(n,)`` image number (-1 off images)."""

    embeds: Tensor
    positions: Tensor
    visual: Tensor
    image: Tensor
    padding: int  # left padding removed from the batch row


def capture_prompts(
    model, inputs: dict, image_sizes: list[list[int]], generate: bool = False
) -> list[Prompt]:
    """Merged embeddings and position ids as the model hands them to its decoder, split per sample.

    ``generate=True`` captures the prefill of ``model.generate`` (its position ids come from the
    attention mask, unlike a plain forward). ``image_sizes[b]``: token count of each image of
    sample ``b`` in sequence order (the visual tokens are split into images by these counts).
    """
    decoder = model.model.language_model
    got: dict = {}

    def grab(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"].detach()
        got["positions"] = kwargs.get("position_ids")
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
    elif pos.shape[0] == 4:  # Qwen in generate: text positions first, then the 3 MRoPE axes
        pos = pos[1:]
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    image_token = int(model.config.image_token_id)
    prompts = []
    for b in range(batch):
        keep = valid[b]
        visual = ids[b][keep] == image_token
        image = torch.full((int(keep.sum()),), -1, dtype=torch.long)
        sizes = image_sizes[b]
        if int(visual.sum()) != sum(sizes):
            raise ValueError(f"sample {b}: {int(visual.sum())} image tokens, image sizes {sizes}")
        image[visual] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        prompts.append(
            Prompt(
                embeds=embeds[b][keep].to(F64),
                positions=pos[:, b][:, keep].long(),
                visual=visual,
                image=image,
                padding=int((~keep).sum()),
            )
        )
    return prompts


@dataclass
class LayerWeights:
    ln1: Tensor
    eps1: float
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    ln2: Tensor
    eps2: float
    gate: Tensor
    up: Tensor
    down: Tensor


def _linear_weights(module) -> tuple[Tensor, Tensor | None]:
    bias = module.bias.detach().to(F64) if module.bias is not None else None
    return module.weight.detach().to(F64), bias


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", None)))


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
    inv_freq: Tensor  # (head_dim / 2,)
    axis_of_freq: Tensor  # (head_dim / 2,): which position axis drives each frequency

    @classmethod
    def of(cls, model) -> Weights:
        decoder = model.model.language_model
        cfg = decoder.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r}: the reference implements SwiGLU (silu)")
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type={rope.get('rope_type')!r}: the reference implements 'default'")
        layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(
                LayerWeights(
                    ln1=layer.input_layernorm.weight.detach().to(F64),
                    eps1=_eps(layer.input_layernorm),
                    q=_linear_weights(attn.q_proj),
                    k=_linear_weights(attn.k_proj),
                    v=_linear_weights(attn.v_proj),
                    o=_linear_weights(attn.o_proj),
                    ln2=layer.post_attention_layernorm.weight.detach().to(F64),
                    eps2=_eps(layer.post_attention_layernorm),
                    gate=mlp.gate_proj.weight.detach().to(F64),
                    up=mlp.up_proj.weight.detach().to(F64),
                    down=mlp.down_proj.weight.detach().to(F64),
                )
            )
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        inv_freq = decoder.rotary_emb.inv_freq.detach().to(F64)
        section = rope.get("mrope_section")
        if section is None:  # 1-D RoPE: every frequency follows the single position axis
            axis = torch.zeros(head_dim // 2, dtype=torch.long)
        else:  # MRoPE: consecutive frequency chunks follow the t, h, w axes in turn
            if sum(section) != head_dim // 2:
                raise ValueError(f"mrope_section={section} does not cover head_dim/2 = {head_dim // 2}")
            axis = torch.repeat_interleave(torch.arange(len(section)) % 3, torch.tensor(section))
        return cls(
            layers=layers,
            norm=decoder.norm.weight.detach().to(F64),
            norm_eps=_eps(decoder.norm),
            head=model.lm_head.weight.detach().to(F64),
            embed=decoder.embed_tokens.weight.detach().to(F64),
            heads=heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            inv_freq=inv_freq,
            axis_of_freq=axis,
        )


# ---------------------------------------------------------------------------------------------
# The decoder, in float64
# ---------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def linear(x: Tensor, wb: tuple[Tensor, Tensor | None]) -> Tensor:
    w, b = wb
    return x @ w.T + (b if b is not None else 0.0)


def rope_tables(w: Weights, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``cos``, ``sin`` ``(n, head_dim)`` for ``positions`` ``(axes, n)`` (1 axis or MRoPE's 3)."""
    pos = positions.to(F64)
    axis = w.axis_of_freq.clamp(max=pos.shape[0] - 1)
    angle = pos[axis].T * w.inv_freq  # (n, head_dim / 2): frequency j turns with axis[j]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on ``x`` ``(heads, n, head_dim)``: pairs (i, i + head_dim/2) rotate by the angle."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


def project_heads(x: Tensor, wb, heads: int, head_dim: int) -> Tensor:
    return linear(x, wb).view(x.shape[0], heads, head_dim).transpose(0, 1)


def kv_head_of(w: Weights) -> Tensor:
    """Query head h reads KV head h // (heads / kv_heads) (grouped-query attention)."""
    return torch.arange(w.heads) // (w.heads // w.kv_heads)


@dataclass
class LayerCache:
    """Rotated keys and values ``(kv_heads, c, head_dim)`` of the tokens that went through a layer."""

    keys: Tensor
    values: Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[1]


def run_layer(
    w: Weights, lw: LayerWeights, h: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None
) -> tuple[Tensor, LayerCache]:
    """One decoder layer on tokens ``h`` ``(t, D)`` (in sequence order) after ``cache``'s tokens.

    Token i sees every cached token and new tokens 0..i. Returns the new states and the cache
    extended by the new tokens.
    """
    t = h.shape[0]
    x = rms_norm(h, lw.ln1, lw.eps1)
    q = rotate(project_heads(x, lw.q, w.heads, w.head_dim), cos, sin)
    k = rotate(project_heads(x, lw.k, w.kv_heads, w.head_dim), cos, sin)
    v = project_heads(x, lw.v, w.kv_heads, w.head_dim)
    if cache is not None:
        k, v = torch.cat([cache.keys, k], dim=1), torch.cat([cache.values, v], dim=1)
    c = k.shape[1] - t
    group = kv_head_of(w)
    logits = q @ k[group].transpose(1, 2) / w.head_dim**0.5  # (heads, t, c + t)
    allowed = torch.ones(t, c + t, dtype=torch.bool)
    allowed[:, c:] = torch.ones(t, t, dtype=torch.bool).tril()
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v[group]).transpose(0, 1).reshape(t, -1)
    h = h + linear(out, lw.o)
    x = rms_norm(h, lw.ln2, lw.eps2)
    h = h + (torch.nn.functional.silu(x @ lw.gate.T) * (x @ lw.up.T)) @ lw.down.T
    return h, LayerCache(k, v)


def last_token_scores(w: Weights, lw: LayerWeights, h: Tensor, positions: Tensor, keys: Tensor) -> Tensor:
    """Attention of the last token over ``keys`` (bool ``(n,)``) at layer ``lw``: softmax of that one
    row over the keys, mean over heads. Returns ``(n,)`` with 0 off the keys. The last token is the
    last of the sequence, so every key lies before it (the causal row)."""
    idx = keys.nonzero().flatten()
    last = h.shape[0] - 1
    if int(idx[-1]) != last:
        raise ValueError("the last token must be a key")
    x = rms_norm(h[idx], lw.ln1, lw.eps1)
    cos, sin = rope_tables(w, positions[:, idx])
    q = rotate(project_heads(x[-1:], lw.q, w.heads, w.head_dim), cos[-1:], sin[-1:])  # (H, 1, d)
    k = rotate(project_heads(x, lw.k, w.kv_heads, w.head_dim), cos, sin)  # (KVH, m, d)
    logits = (q @ k[kv_head_of(w)].transpose(1, 2))[:, 0] / w.head_dim**0.5  # (H, m)
    row = logits.softmax(-1).mean(0)
    out = torch.zeros(h.shape[0], dtype=F64)
    out[idx] = row
    return out


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    layers: tuple[int, ...]
    keep: tuple[int | float, ...]
    reroute: bool
    score_from: str = "current"


def keep_count(keep: int | float, n: int) -> int:
    """An int is a count per image; a float f keeps max(1, int(n·f)) of an image's n tokens."""
    if isinstance(keep, float):
        return max(1, int(n * keep))
    if not 1 <= keep <= n:
        raise ValueError(f"keep={keep} for an image of {n} tokens")
    return keep


def top_k(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` best candidates, ties to the earlier token, in ascending order."""
    idx = candidates.nonzero().flatten()
    order = sorted(range(idx.numel()), key=lambda i: (-float(scores[idx[i]]), int(idx[i])))
    return idx[order[:k]].sort().values


@dataclass
class DecisionRecord:
    """Reference view of one decision: float64 ``scores`` of every visual token (0 for
    non-candidates), the ``candidates`` (bool over visual tokens), the reference's own ``selected``
    top-k (indices into the visual tokens) and ``counts`` per image."""

    layer: int
    scores: Tensor
    candidates: Tensor
    selected: Tensor
    counts: list[int]


@dataclass
class RoutedRun:
    """Prefill result of one sample, ready for decoding."""

    weights: Weights
    prompt: Prompt
    logits: Tensor  # (n, V)
    defined: Tensor  # (n,) bool: tokens that went through every layer (text + last stage's visual)
    decisions: list[DecisionRecord]
    caches: list[LayerCache]
    steps: int = 0
    rope_delta: int = 0

    def cache_lengths(self) -> list[int]:
        return [c.length for c in self.caches]

    def decode(self, token: int) -> Tensor:
        """Logits ``(V,)`` of the next token after feeding ``token``: at every layer it attends over
        that layer's cache and itself; its position continues the full numbering, i.e. the model's
        ``rope_deltas`` continuation (position = tokens so far + (max prompt position + 1 − prompt
        length), the delta being 0 for 1-D positions without gaps)."""
        w = self.weights
        position = self.prompt.embeds.shape[0] + self.steps + self.rope_delta
        axes = self.prompt.positions.shape[0]
        cos, sin = rope_tables(w, torch.full((axes, 1), position))
        h = w.embed[token][None]
        for j, lw in enumerate(w.layers):
            h, self.caches[j] = run_layer(w, lw, h, cos, sin, self.caches[j])
        self.steps += 1
        return (rms_norm(h, w.norm, w.norm_eps) @ w.head.T)[0]


def routed_prefill(
    w: Weights, prompt: Prompt, schedule: Schedule, follow: list[Tensor] | None = None
) -> RoutedRun:
    """Prefill one sample with ``schedule``.

    At every decision the reference computes its own scores and top-k; ``follow`` (indices into
    the visual tokens, one per decision) replaces its selection for the rest of the run, so the
    engine's decisions can be checked one at a time against the reference's scores under the same
    history. Without ``follow`` the reference runs on its own decisions.
    """
    n = prompt.embeds.shape[0]
    visual, image = prompt.visual, prompt.image
    vis_idx = visual.nonzero().flatten()
    n_images = int(image.max()) + 1
    sizes = [int((image == i).sum()) for i in range(n_images)]
    state = prompt.embeds.clone()
    present = torch.ones(vis_idx.numel(), dtype=torch.bool)  # visual tokens of the current stage
    caches: list[LayerCache] = []
    records: list[DecisionRecord] = []
    pending: dict[int, tuple[Tensor, Tensor]] = {}
    decision_of = {layer: i for i, layer in enumerate(schedule.layers)}

    def candidates() -> Tensor:
        if schedule.reroute:  # every visual token competes, deferred ones with their carried state
            return torch.ones_like(present)
        return present.clone()  # prune: only the survivors of the last decision

    def score(layer: int, cand: Tensor) -> Tensor:
        keys = ~visual.clone()
        keys[vis_idx[cand]] = True
        return last_token_scores(w, w.layers[layer], state, prompt.positions, keys)[vis_idx]

    for j, lw in enumerate(w.layers):
        if j in decision_of:
            i = decision_of[j]
            if schedule.score_from == "current":
                cand = candidates()
                scores = score(j, cand)
            else:
                cand, scores = pending.pop(j)
            counts = [keep_count(schedule.keep[i], s) for s in sizes]
            vis_image = image[vis_idx]
            own = (
                torch.cat([top_k(scores, cand & (vis_image == m), counts[m]) for m in range(n_images)])
                .sort()
                .values
            )
            records.append(DecisionRecord(j, torch.where(cand, scores, 0.0), cand, own, counts))
            chosen = own if follow is None else follow[i]
            present = torch.zeros_like(present)
            present[chosen] = True
        if schedule.score_from == "previous" and j + 1 in decision_of:
            cand = candidates()
            pending[j + 1] = (cand, score(j, cand))
        stage = ~visual.clone()
        stage[vis_idx[present]] = True
        idx = stage.nonzero().flatten()
        cos, sin = rope_tables(w, prompt.positions[:, idx])
        out, cache = run_layer(w, lw, state[idx], cos, sin, None)
        state[idx] = out
        caches.append(cache)
    logits = rms_norm(state, w.norm, w.norm_eps) @ w.head.T
    defined = ~visual.clone()
    defined[vis_idx[present]] = True
    delta = int(prompt.positions.max()) + 1 - n
    return RoutedRun(w, prompt, logits, defined, records, caches, rope_delta=delta)
