"""A Llama-family forward pass with a pluggable KV-cache policy, for long-context evaluation.

RazorAttention needs per-head ragged caches with a logit bias, LongCache needs *un-rotated* keys that
are re-positioned on every call; neither fits a stock attention call. This module runs the model's own
modules (norms, projections, MLP, LM head, rotary frequencies) and hands each layer's attention to a
policy object: `policy.attend(layer, q, k, v, positions) -> [B, Hq, T, D]`, with q/k un-rotated.
`FullAttention` (plain causal attention over everything) is the baseline; a test checks that it
reproduces the HF model's logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           scaling: float = 1.0) -> torch.Tensor:
    """RoPE as in HF Llama (rotate_half convention); x [B, H, T, D], positions [T]."""
    freqs = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, bias=None, q_pos=None, k_pos=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v with GQA; keys with k_pos > q_pos are masked (causal).

    q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D]; bias [B or 1, Hkv, Tk] added to every query's logits."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.repeat_interleave(groups, dim=1)[:, :, None, :].float()
    if q_pos is not None:
        logits = logits.masked_fill(k_pos[None, None, None, :] > q_pos[None, None, :, None], float("-inf"))
    return (logits.softmax(-1) @ v.float()).to(q.dtype)


def fast_attention(q, k, v, q_pos=None, k_pos=None) -> torch.Tensor:
    """`attention` without a bias through torch's fused SDPA (flash / memory-efficient kernels on CUDA), the
    honest baseline for cache policies. Keys must be in position order with the queries' positions last
    (true for a growing cache): a single query then sees every key and needs no mask."""
    mask = None
    if q_pos is not None and q.shape[2] > 1:
        mask = k_pos[None, :] <= q_pos[:, None]
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


# cuDNN's SDPA builds a graph per shape: a cache that grows by one key per decoded token rebuilt it every
# step (most of a decode step's time on an H200), so decoding uses flash / memory-efficient / math only.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Rope:
    """The model's rotary frequencies (so a raised rope_theta is honoured)."""

    def __init__(self, model):
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotate(x, positions, self.inv_freq.to(x.device), self.scaling)


class Growing:
    """A tensor appended to along `dim` without copying it on every step (`torch.cat` per decoded token reads
    and writes the whole cache again: 3x the traffic of attention's own read): storage grows by at least an
    eighth when full, and `view` is the filled part (strided; SDPA reads it in place)."""

    def __init__(self, x: torch.Tensor, dim: int, filled: int | None = None):
        """`x` is the storage; its first `filled` entries along `dim` are in use (default: all)."""
        self.dim, self.n, self.buf = dim, x.shape[dim] if filled is None else filled, x

    def append(self, x: torch.Tensor) -> torch.Tensor:
        need = self.n + x.shape[self.dim]
        if need > self.buf.shape[self.dim]:
            shape = list(self.buf.shape)
            shape[self.dim] = max(need, shape[self.dim] + shape[self.dim] // 8 + 256)
            grown = self.buf.new_empty(shape)
            grown.narrow(self.dim, 0, self.n).copy_(self.view())
            self.buf = grown
        self.buf.narrow(self.dim, self.n, x.shape[self.dim]).copy_(x)
        self.n = need
        return self.view()

    def view(self) -> torch.Tensor:
        return self.buf.narrow(self.dim, 0, self.n)

    def nbytes(self) -> int:
        """Bytes of the filled part (what the policy keeps; spare capacity is at most an eighth more)."""
        return self.view().numel() * self.buf.element_size()


class FullAttention:
    """Plain causal attention; keeps rotated keys (positions never change)."""

    def __init__(self, model):
        self.rope, self.cache = Rope(model), {}  # layer -> Growing k, v, positions

    def attend(self, layer: int, q, k, v, positions):
        k = self.rope(k, positions)
        if layer not in self.cache:
            self.cache[layer] = (Growing(k, 2), Growing(v, 2), Growing(positions, 0))
            keys, values, pos = k, v, positions
        else:
            keys, values, pos = (g.append(x) for g, x in zip(self.cache[layer], (k, v, positions)))
        return fast_attention(self.rope(q, positions), keys, values, positions, pos)

    @property
    def k(self) -> dict[int, torch.Tensor]:
        """Each layer's rotated keys [B, Hkv, T, D] (inspection, tests)."""
        return {layer: cache[0].view() for layer, cache in self.cache.items()}

    @property
    def v(self) -> dict[int, torch.Tensor]:
        return {layer: cache[1].view() for layer, cache in self.cache.items()}

    def pop(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of one layer, removed from this cache (RazorAttention takes it over)."""
        return tuple(g.view() for g in self.cache.pop(layer))

    def cache_bytes(self) -> int:
        return sum(g.nbytes() for k, v, _ in self.cache.values() for g in (k, v))

    def clone(self) -> FullAttention:
        """An independent copy of this cache, so one prefill serves every policy that starts from full
        attention (full, RazorAttention with any heads): the long prompt runs once per needle, not per
        policy."""
        twin = FullAttention.__new__(FullAttention)
        twin.rope = self.rope
        twin.cache = {layer: tuple(Growing(g.view().clone(), g.dim) for g in cache)
                      for layer, cache in self.cache.items()}
        return twin


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


@torch.no_grad()
def forward(model, ids: torch.Tensor, policy, start: int) -> torch.Tensor:
    """Logits for `ids` [B, T] occupying positions start..start+T-1, the policy holding the past."""
    cfg, lm = model.config, model.model
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    h = lm.embed_tokens(ids)
    for i, layer in enumerate(lm.layers):
        attn, x = layer.self_attn, layer.input_layernorm(h)
        q, k, v = (split_heads(p(x), n)
                   for p, n in ((attn.q_proj, hq), (attn.k_proj, hkv), (attn.v_proj, hkv)))
        out = policy.attend(i, q, k, v, positions)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))


def prefill(model, ids: torch.Tensor, policy, chunk: int = 512) -> torch.Tensor:
    """Feed a long prompt in chunks (LongCache's chunked prefill); returns the last chunk's logits."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = forward(model, ids[:, start:start + chunk], policy, start)
        if hasattr(policy, "after_chunk"):
            policy.after_chunk()
    return logits


def start_decoding(model, context: torch.Tensor, policy, chunk: int = 512) -> None:
    """Prefill all but the context's last token; decoding then feeds that token as its first step."""
    prefill(model, context[:, :-1], policy, chunk)


def greedy_decode(model, context: torch.Tensor, steps: int, policy, chunk: int = 512,
                  stop_unless: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy tokens after `context`, one token per forward call, so a policy's cache selection only ever sees
    tokens the model itself produced; with `stop_unless`, stops at the first token that differs from it."""
    start_decoding(model, context, policy, chunk)
    return decode_steps(model, context, steps, policy, stop_unless)


def decode_steps(model, context: torch.Tensor, steps: int, policy, stop_unless: torch.Tensor | None = None):
    """Greedy decoding from a policy that already holds all of `context` but its last token."""
    if hasattr(policy, "after_prefill"):
        policy.after_prefill()
    token, out = context[:, -1:], []
    for step in range(steps):
        token = forward(model, token, policy, context.shape[1] - 1 + step)[:, -1:].argmax(-1)
        out.append(token)
        if stop_unless is not None and not torch.equal(token, stop_unless[:, step:step + 1]):
            break
    return torch.cat(out, dim=1)


def answer_accuracy(model, context: torch.Tensor, answer: torch.Tensor, policy, chunk: int = 512) -> bool:
    """Exact match of greedy decoding with `answer`, token by token: a teacher-forced answer chunk would let
    the gold tokens steer a selecting policy (LongCache picks spans from every query of a call)."""
    decoded = greedy_decode(model, context, answer.shape[1], policy, chunk, stop_unless=answer)
    return decoded.shape == answer.shape and bool(torch.equal(decoded, answer))


def answers_after_one_prefill(model, context: torch.Tensor, answer: torch.Tensor, starts: dict,
                              chunk: int = 512) -> dict:
    """{name: (hit, policy)} for policies that all begin from full attention over the prompt: the prompt is
    prefilled once and each policy gets its own copy of that cache (`starts[name](full_copy) -> policy`), so
    the result equals `answer_accuracy` per policy at a third of the cost for three policies (tested)."""
    full = FullAttention(model)
    prefill(model, context[:, :-1], full, chunk)
    out = {}
    for name, start in starts.items():
        policy = start(full.clone())
        decoded = decode_steps(model, context, answer.shape[1], policy, stop_unless=answer)
        out[name] = (decoded.shape == answer.shape and bool(torch.equal(decoded, answer)), policy)
    return out
