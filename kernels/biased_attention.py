"""Triton kernel: causal GQA attention with a per-key additive logit bias (RazorAttention's
compensation token gets + log n_d; padding gets -inf). Same contract as `kernels.decoding.attention`,
which is its PyTorch reference. One program per (batch x query head, query, key split): each streams its
`SPLIT` keys in blocks with an online softmax and writes a partial (max, sum, weighted values); the
partials are merged in PyTorch (split-K, as in flash-decoding). Without the split a decoding step (one
query) ran one program per head, i.e. 16 of an H100's 132 multiprocessors streaming 64k keys each.
No [Tq, Tk] matrix is materialized. Used on CUDA; on CPU only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SPLIT, BLOCK_N = 512, 64  # keys per program, keys per block inside it


@triton.jit
def _biased_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, qpos_ptr, kpos_ptr, acc_ptr, max_ptr, sum_ptr,
                             Tq, Tk, D, Hq, Hkv, n_splits, scale, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    i = tl.program_id(1)
    split = tl.program_id(2)
    kvh = (bh // Hq) * Hkv + (bh % Hq) // (Hq // Hkv)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + (bh * Tq + i) * D + d, mask=dmask, other=0.0).to(tl.float32)
    q_pos = tl.load(qpos_ptr + i)
    running_max = tl.full((), float("-inf"), tl.float32)
    denom = tl.full((), 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(split * SPLIT, split * SPLIT + SPLIT, BLOCK_N):
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
    part = (bh * Tq + i) * n_splits + split
    tl.store(acc_ptr + part * D + d, acc, mask=dmask)
    tl.store(max_ptr + part, running_max)
    tl.store(sum_ptr + part, denom)


def merge_splits(acc: torch.Tensor, running_max: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """Combine per-split partials [..., S, D] / [..., S] into softmax-weighted values [..., D]."""
    top = running_max.amax(-1, keepdim=True)
    weight = torch.exp(running_max - top.clamp(min=torch.finfo(top.dtype).min))  # all -inf split: weight 0
    weight = torch.where(running_max == float("-inf"), 0.0, weight)
    return (acc * weight[..., None]).sum(-2) / (denom * weight).sum(-1, keepdim=True)


def biased_attention(q, k, v, bias=None, q_pos=None, k_pos=None) -> torch.Tensor:
    """Drop-in for `kernels.decoding.attention` (q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], bias [B|1, Hkv,
    Tk])."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if bias is None:
        bias = torch.zeros(b, hkv, tk, device=q.device)
    bias = bias.expand(b, hkv, tk).float().contiguous()
    q_pos = q_pos if q_pos is not None else torch.full((tq,), tk, device=q.device)
    k_pos = k_pos if k_pos is not None else torch.zeros(tk, dtype=torch.long, device=q.device)
    split = min(SPLIT, triton.next_power_of_2(max(tk, BLOCK_N)))
    n_splits = triton.cdiv(tk, split)
    acc = torch.empty(b, hq, tq, n_splits, d, dtype=torch.float32, device=q.device)
    running_max = torch.empty(b, hq, tq, n_splits, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(running_max)
    grid = (b * hq, tq, n_splits)
    _biased_attention_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), bias,
                                   q_pos.long().contiguous(),
                                   k_pos.long().contiguous(), acc, running_max, denom, tq, tk, d, hq, hkv,
                                   n_splits, 1.0 / math.sqrt(d), SPLIT=split, BLOCK_N=BLOCK_N,
                                   BLOCK_D=triton.next_power_of_2(d))
    return merge_splits(acc, running_max, denom).to(q.dtype)
