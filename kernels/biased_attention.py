"""Triton kernel: causal GQA attention with a per-key additive logit bias (RazorAttention's
compensation token gets + log n_d; padding gets -inf). Same contract as `kernels.decoding.attention`,
which is its PyTorch reference. One program per (batch x query head, query); keys are streamed in
blocks with an online softmax, so no [Tq, Tk] matrix is materialized. Used on CUDA; on CPU only under
TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _biased_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, qpos_ptr, kpos_ptr, out_ptr, Tq, Tk, D, Hq, Hkv,
                             scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    i = tl.program_id(1)
    kvh = (bh // Hq) * Hkv + (bh % Hq) // (Hq // Hkv)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + (bh * Tq + i) * D + d, mask=dmask, other=0.0).to(tl.float32)
    q_pos = tl.load(qpos_ptr + i)
    running_max = tl.full((), float("-inf"), tl.float32)
    denom = tl.full((), 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, Tk, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < Tk
        tile = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + (kvh * Tk + n[:, None]) * D + d[None, :], mask=tile, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (kvh * Tk + n[:, None]) * D + d[None, :], mask=tile, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + kvh * Tk + n, mask=nmask, other=float("-inf"))
        k_pos = tl.load(kpos_ptr + n, mask=nmask, other=0)
        s = tl.sum(k * q[None, :], axis=1) * scale + bias
        s = tl.where(nmask & (k_pos <= q_pos), s, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all masked so far: avoid inf - inf
        p = tl.exp(s - shift)
        alpha = tl.exp(running_max - shift)
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        running_max = new_max
    tl.store(out_ptr + (bh * Tq + i) * D + d, acc / denom, mask=dmask)


def biased_attention(q, k, v, bias=None, q_pos=None, k_pos=None) -> torch.Tensor:
    """Drop-in for `kernels.decoding.attention` (q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], bias [B|1, Hkv, Tk])."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if bias is None:
        bias = torch.zeros(b, hkv, tk, device=q.device)
    bias = bias.expand(b, hkv, tk).float().contiguous()
    q_pos = q_pos if q_pos is not None else torch.full((tq,), tk, device=q.device)
    k_pos = k_pos if k_pos is not None else torch.zeros(tk, dtype=torch.long, device=q.device)
    out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
    grid = (b * hq, tq)
    _biased_attention_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), bias, q_pos.long().contiguous(),
                                   k_pos.long().contiguous(), out, tq, tk, d, hq, hkv, 1.0 / math.sqrt(d),
                                   BLOCK_N=64, BLOCK_D=triton.next_power_of_2(d))
    return out.to(q.dtype)
