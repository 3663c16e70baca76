"""A plain, slow float64 reference of routed execution, written from the method spec (method.md).

It shares no code with ``vlm_reroute`` (nor with ``tests/reference.py``). From the model it takes
what belongs to the model, not to the method: the merged input embeddings, the model's own
position ids and (Qwen3-VL) its DeepStack rows (captured on the decoder's input), the weights, the
RMSNorm epsilons, the RoPE ``inv_freq`` buffer, ``mrope_section`` and ``layer_types``. Everything
after that is computed here in float64, one sample at a time with its padding removed (padding is
then neither a key nor a query): RMSNorm, Q/K/V/O projections, RoPE / Qwen MRoPE, GQA, causal
attention, SwiGLU MLP, final norm, LM head, the last-token attention score, per-image top-k,
prune / reroute stages, and decoding over each layer's own cache.

Family semantics, written from the models (``docs/families-notes.md`` cites the transformers lines):

* decoder at ``model.model.language_model``, or ``model.model.text_model`` (Idefics3, SmolVLM);
* Qwen2-VL / Qwen2.5-VL MRoPE: consecutive frequency chunks follow t, h, w; Qwen3-VL and Qwen3.5:
  *interleaved* — frequency ``j`` follows h if ``j % 3 == 1`` and ``j < 3·section[1]``, w if
  ``j % 3 == 2`` and ``j < 3·section[2]``, else t;
* Qwen3-VL (and MoE): q/k RMSNorm per head before RoPE; DeepStack level ``i`` is added after decoder
  layer ``i`` to the visual tokens, each its own row — under routing to the visual tokens present
  in that layer only; the MoE MLP routes each token to its top-k experts (softmax, renormalised);
* Qwen3.5: zero-centred RMSNorm ``x·rsqrt(mean x²+eps)·(1+w)`` (the gated norm of the linear layers
  is plain); full-attention layers with a gated query (``q_proj`` gives query and gate per head),
  q/k norms and partial RoPE (the first ``2·len(inv_freq)`` dims rotate); linear-attention layers:
  causal depthwise convolution, SiLU, the gated delta rule, gated RMSNorm, output projection. Under
  routing a linear layer runs on its stage's tokens in sequence order, as if the others were absent.

Method: FastV (arXiv 2403.06764), PyramidDrop (arXiv 2410.17247), Reroute (arXiv 2606.12412).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fuzz_weights import (
    F64,
    AttentionWeights,
    LayerWeights,
    LinearWeights,
    MlpWeights,
    Prompt,
    Weights,
    rms_norm,
)
from torch import Tensor


# ---------------------------------------------------------------------------------------------
# The decoder, in float64
# ---------------------------------------------------------------------------------------------
def linear(x: Tensor, wb: tuple[Tensor, Tensor | None]) -> Tensor:
    w, b = wb
    return x @ w.T + (b if b is not None else 0.0)


def rope_tables(w: Weights, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``cos``, ``sin`` ``(n, rotary_dim)`` for ``positions`` ``(axes, n)`` (1 axis or MRoPE's 3)."""
    pos = positions.to(F64)
    axis = w.axis_of_freq.clamp(max=pos.shape[0] - 1)
    angle = pos[axis].T * w.inv_freq  # (n, rotary_dim / 2): frequency j turns with axis[j]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on ``x`` ``(heads, n, head_dim)``: in the first ``rotary_dim`` dims, pairs
    (i, i + rotary_dim/2) rotate by the angle; the other dims (partial RoPE) pass through."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + turned * sin, rest], dim=-1)


def project_heads(x: Tensor, wb, heads: int, head_dim: int) -> Tensor:
    return linear(x, wb).view(x.shape[0], heads, head_dim).transpose(0, 1)


def kv_head_of(w: Weights) -> Tensor:
    """Query head h reads KV head h // (heads / kv_heads) (grouped-query attention)."""
    return torch.arange(w.heads) // (w.heads // w.kv_heads)


def queries_keys(w: Weights, a: AttentionWeights, x: Tensor, cos: Tensor, sin: Tensor):
    """Rotated queries ``(heads, n, d)``, keys ``(kv_heads, n, d)``, values and the output gate
    (``(n, heads·d)`` or None) of normed inputs ``x`` ``(n, D)``."""
    n, d = x.shape[0], w.head_dim
    gate = None
    if a.gated:  # per head: [query | gate]
        both = linear(x, a.q).view(n, w.heads, 2 * d)
        q, gate = both[..., :d].transpose(0, 1), both[..., d:].reshape(n, w.heads * d)
    else:
        q = project_heads(x, a.q, w.heads, d)
    k = project_heads(x, a.k, w.kv_heads, d)
    if a.q_norm is not None:
        q, k = w.rms(q, a.q_norm, a.qk_eps), w.rms(k, a.k_norm, a.qk_eps)
    v = project_heads(x, a.v, w.kv_heads, d)
    return rotate(q, cos, sin), rotate(k, cos, sin), v, gate


@dataclass
class LayerCache:
    """Rotated keys and values ``(kv_heads, c, head_dim)`` of the tokens that went through a layer
    (attention), or (linear attention, ``keys``) the layer's normed inputs ``(c, D)`` of those
    tokens, in order: the conv window and the recurrent state are a function of them."""

    keys: Tensor
    values: Tensor | None = None

    @property
    def length(self) -> int | None:
        return self.keys.shape[1] if self.values is not None else None


def gated_delta_net(lw: LinearWeights, x: Tensor) -> Tensor:
    """Qwen3.5's linear-attention mixer on normed inputs ``x`` ``(t, D)`` in order: ``(t, D)``."""
    t = x.shape[0]
    mixed = x @ lw.qkv.T  # (t, channels)
    kernel = lw.conv.shape[1]
    padded = torch.cat([mixed.new_zeros(kernel - 1, mixed.shape[1]), mixed])
    conv = sum(padded[i : i + t] * lw.conv[:, i] for i in range(kernel))  # causal depthwise
    conv = torch.nn.functional.silu(conv)
    kd, vd = lw.k_heads * lw.k_dim, lw.v_heads * lw.v_dim
    q = conv[:, :kd].view(t, lw.k_heads, lw.k_dim)
    k = conv[:, kd : 2 * kd].view(t, lw.k_heads, lw.k_dim)
    v = conv[:, 2 * kd : 2 * kd + vd].view(t, lw.v_heads, lw.v_dim)
    group = lw.v_heads // lw.k_heads  # value head h reads query/key head h // group
    q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6) * lw.k_dim**-0.5
    k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(x @ lw.b.T)  # (t, v_heads)
    decay = -lw.a_log.exp() * torch.nn.functional.softplus(x @ lw.a.T + lw.dt_bias)  # log decay
    state = x.new_zeros(lw.v_heads, lw.k_dim, lw.v_dim)
    out = x.new_zeros(t, lw.v_heads, lw.v_dim)
    for i in range(t):
        state = state * decay[i].exp()[:, None, None]
        remembered = torch.einsum("hkv,hk->hv", state, k[i])
        delta = (v[i] - remembered) * beta[i][:, None]
        state = state + torch.einsum("hk,hv->hkv", k[i], delta)
        out[i] = torch.einsum("hkv,hk->hv", state, q[i])
    z = (x @ lw.z.T).view(t, lw.v_heads, lw.v_dim)
    normed = rms_norm(out, lw.norm, lw.norm_eps) * torch.nn.functional.silu(z)
    return normed.reshape(t, -1) @ lw.out.T


#: A MoE router whose k-th and (k+1)-th expert probabilities are closer than this has no answer the
#: float32 model and this float64 reference must agree on (rounding can pick either expert).
ROUTER_TIE = 1e-5


class RouterTie(Exception):
    """The reference met an expert choice that float rounding decides: the case cannot be checked."""


def mlp(m: MlpWeights, x: Tensor) -> Tensor:
    silu = torch.nn.functional.silu
    if m.router is None:
        return (silu(x @ m.gate.T) * (x @ m.up.T)) @ m.down.T
    probs = (x @ m.router.T).softmax(-1)
    if m.top_k < probs.shape[-1]:
        ranked = probs.topk(m.top_k + 1, dim=-1).values
        margin = float((ranked[:, -2] - ranked[:, -1]).min())
        if margin < ROUTER_TIE:
            raise RouterTie(f"expert probabilities {margin:.1e} apart at the top-{m.top_k} boundary")
    top, chosen = probs.topk(m.top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    inner = m.experts.shape[1] // 2
    for t in range(x.shape[0]):
        for weight, e in zip(top[t].tolist(), chosen[t].tolist(), strict=True):
            gate_up = m.experts[e] @ x[t]
            out[t] += weight * (m.expert_down[e] @ (silu(gate_up[:inner]) * gate_up[inner:]))
    return out


def run_layer(
    w: Weights, lw: LayerWeights, h: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None
) -> tuple[Tensor, LayerCache]:
    """One decoder layer on tokens ``h`` ``(t, D)`` (in sequence order) after ``cache``'s tokens.

    Attention: token i sees every cached token and new tokens 0..i. Linear attention: the mixer runs
    over the cached tokens and the new ones, in order. Returns the new states and the extended cache.
    """
    t = h.shape[0]
    x = w.rms(h, lw.ln1, lw.eps1)
    if lw.linear:
        seen = x if cache is None else torch.cat([cache.keys, x])
        mixed = gated_delta_net(lw.mixer, seen)[-t:]
        new_cache = LayerCache(seen)
    else:
        q, k, v, gate = queries_keys(w, lw.mixer, x, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache.keys, k], dim=1), torch.cat([cache.values, v], dim=1)
        c = k.shape[1] - t
        group = kv_head_of(w)
        logits = q @ k[group].transpose(1, 2) / w.head_dim**0.5  # (heads, t, c + t)
        allowed = torch.ones(t, c + t, dtype=torch.bool)
        allowed[:, c:] = torch.ones(t, t, dtype=torch.bool).tril()
        logits = logits.masked_fill(~allowed, float("-inf"))
        out = (logits.softmax(-1) @ v[group]).transpose(0, 1).reshape(t, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        mixed = linear(out, lw.mixer.o)
        new_cache = LayerCache(k, v)
    h = h + mixed
    h = h + mlp(lw.mlp, w.rms(h, lw.ln2, lw.eps2))
    return h, new_cache


def last_token_scores(w: Weights, lw: LayerWeights, h: Tensor, positions: Tensor, keys: Tensor) -> Tensor:
    """Attention of the last token over ``keys`` (bool ``(n,)``) at layer ``lw``: softmax of that one
    row over the keys, mean over heads. Returns ``(n,)`` with 0 off the keys. The last token is the
    last of the sequence, so every key lies before it (the causal row)."""
    if lw.linear:
        raise ValueError("a linear-attention layer has no attention row to score with")
    idx = keys.nonzero().flatten()
    last = h.shape[0] - 1
    if int(idx[-1]) != last:
        raise ValueError("the last token must be a key")
    x = w.rms(h[idx], lw.ln1, lw.eps1)
    cos, sin = rope_tables(w, positions[:, idx])
    q, k, _, _ = queries_keys(w, lw.mixer, x, cos, sin)
    logits = (q[:, -1:] @ k[kv_head_of(w)].transpose(1, 2))[:, 0] / w.head_dim**0.5  # (H, m)
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

    def cache_lengths(self) -> list[int | None]:
        """Tokens each layer caches (None for a linear-attention layer: a fixed-size state)."""
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
        return (w.rms(h, w.norm, w.norm_eps) @ w.head.T)[0]


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
        if j < len(prompt.deepstack):  # DeepStack: the visual tokens of this stage get their own rows
            rows = prompt.deepstack[j]
            present_rank = present.nonzero().flatten()
            out = out.clone()
            out[visual[idx]] += rows[present_rank]
        state[idx] = out
        caches.append(cache)
    logits = w.rms(state, w.norm, w.norm_eps) @ w.head.T
    defined = ~visual.clone()
    defined[vis_idx[present]] = True
    delta = int(prompt.positions.max()) + 1 - n
    return RoutedRun(w, prompt, logits, defined, records, caches, rope_delta=delta)
