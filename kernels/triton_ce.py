"""Triton kernel for the mini-sequence LM head + cross-entropy (MsT, arXiv 2407.15892).

The chunk loop and the matmuls live in `kernels.reference.ChunkedLMHeadCE`; this module replaces its
per-chunk softmax/CE/gradient step with one fused kernel: one program per row streams the logits tile by
tile twice (online max + sum-exp, then `softmax - onehot` written back in place), so the step reads each
logit twice and writes it once instead of the ~6 passes of the PyTorch reference and allocates nothing of
size `[rows, vocab]`. It works on the matmul's own output (bf16 on a GPU; maths in fp32 registers), as
Liger-Kernel's fused linear CE does, so no fp32 copy of a chunk's logits exists. On CUDA it is the default; on
CPU it runs only under Triton's
interpreter (`TRITON_INTERPRET=1`, set before `import triton`), which is how CI tests it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from tracecore.kernels.reference import IGNORE_INDEX, lm_head_ce


@triton.jit
def _ce_grad_kernel(logits_ptr, row_stride, labels_ptr, loss_ptr, n_cols, scale, ignore_index,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)

    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    target = tl.load(base + safe_label).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    row_scale = tl.where(valid, scale, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)
        tl.store(base + cols, (grad * row_scale).to(logits_ptr.dtype.element_ty), mask=mask)


def launch_shape(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps): wide tiles and many warps per row, since a row is one program streaming the whole
    vocabulary twice; at 128k columns a 4,096-wide tile with 4 warps left the GPU latency-bound."""
    block = min(triton.next_power_of_2(vocab), 16384)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def triton_ce_grad_(logits: torch.Tensor, labels: torch.Tensor, scale: float, block: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """Drop-in for `reference.torch_ce_grad_`: per-row CE; `logits` (fp32, bf16 or fp16, computed in fp32)
    becomes scale * dCE/dlogits in its own dtype. `block`/`num_warps` override `launch_shape` (benchmarks)."""
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not logits.is_contiguous():
        raise ValueError(f"triton_ce_grad_: logits must be contiguous fp32/bf16/fp16, got {logits.dtype}")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    default_block, default_warps = launch_shape(vocab)
    _ce_grad_kernel[(rows,)](logits, logits.stride(0), labels.contiguous(), loss, vocab, float(scale),
                             IGNORE_INDEX, BLOCK=block or default_block, num_warps=num_warps or default_warps)
    return loss


def triton_available(device: torch.device) -> bool:
    """CUDA tensors, or any tensors when Triton's CPU interpreter is switched on."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_lm_head_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunks: int,
                      denominator: float | None = None) -> torch.Tensor:
    """`reference.lm_head_ce` with the fused Triton softmax/CE/gradient step, in place on the matmul's
    logits."""
    return lm_head_ce(hidden, weight, labels, chunks, denominator, ce_grad=triton_ce_grad_, fp32_logits=False)
