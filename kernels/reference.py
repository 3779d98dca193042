"""Mini-Sequence Transformer (MsT, arXiv 2407.15892) in plain PyTorch: the CPU path and the test oracle.

* `lm_head_ce`: LM head + cross-entropy over sequence chunks. The full `[tokens, vocab]` logits are
  never materialized: each chunk's fp32 logits become its loss and, in place, its logit gradient
  `softmax - onehot` (ignored rows zeroed), from which the chunk's hidden-state gradient and its share
  of the LM-head weight gradient are formed at once, both as matmuls in the weight's dtype (bf16 tensor
  cores on a GPU; the weight gradient accumulates in that dtype, as Liger-Kernel's does: an fp32
  accumulator made the H200 step 4x slower than plain, fp32 GEMMs, and cost 2 GB more at Llama-3 shapes).
  Backward only rescales the stored gradients by the upstream gradient, in place. This is the same maths as
  the official `LMheadWarpper`,
  but its gradients are formed during the forward pass (as Liger-Kernel's fused linear CE does) instead
  of recomputing the logits in backward: one matmul pass fewer, same peak.
  Deviation from the official code, on purpose: chunks come from `tensor_split`, so a length that does
  not divide by the chunk count keeps its tail (the official loop drops it).
* `mini_sequence_mlp`: any gate/up/down MLP run per sequence chunk; backward recomputes one chunk at a
  time, so only one `[chunk, intermediate]` activation lives at once.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def torch_ce_grad_(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row CE of fp32 `logits` [rows, vocab]; overwrites `logits` with scale * dCE/dlogits."""
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, safe[:, None])[:, 0]) * valid
    logits.sub_(lse[:, None]).exp_()
    logits[torch.arange(len(labels), device=logits.device), safe] -= 1.0
    logits.mul_((valid * scale)[:, None].to(logits.dtype))
    return loss


CeGrad = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class ChunkedLMHeadCE(torch.autograd.Function):
    """sum_rows CE(hidden @ weight.T, labels) / denominator, chunk by chunk (see module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunks: int, denominator: float, ce_grad: CeGrad,
                fp32_logits: bool):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = 1.0 / denominator
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows in torch.arange(hidden.shape[0]).tensor_split(chunks):
            if len(rows) == 0:
                continue
            start, stop = int(rows[0]), int(rows[-1]) + 1
            h = hidden[start:stop]
            logits = h @ weight.T
            logits = logits.float() if fp32_logits else logits
            total += ce_grad(logits, labels[start:stop], scale).sum()
            grad_logits = logits.to(weight.dtype)
            if need_h:
                torch.mm(grad_logits, weight, out=grad_h[start:stop])  # no [rows, d] temporary (16 MB at 64k)
            if need_w:
                grad_w.addmm_(grad_logits.T, h.to(weight.dtype))
            del logits, grad_logits  # else the next chunk's matmul runs while this chunk's logits still live
        ctx.save_for_backward(grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors  # used once: scaled in place, no second copy of the weight's size
        dh = grad_h.mul_(grad_out) if grad_h is not None else None
        dw = grad_w.mul_(grad_out) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def lm_head_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunks: int,
               denominator: float | None = None, ce_grad: CeGrad = torch_ce_grad_,
               fp32_logits: bool = True) -> torch.Tensor:
    """Mean CE over non-ignored rows of `hidden` [rows, d] (or sum / `denominator`, for grad accumulation).

    `fp32_logits=False` hands `ce_grad` the matmul's own output (bf16 on a GPU) to work on in place: the
    Triton kernel computes in fp32 in registers, so an fp32 copy of the chunk's logits and the cast of the
    gradient back would only cost memory and two passes (the values equal the fp32 path's: upcasting bf16
    logits is exact, and the gradient is rounded to bf16 before its matmuls either way).

    With no valid label at all the loss is 0 with zero gradients (plain CE's mean would be NaN)."""
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"lm_head_ce: {hidden.shape[0]} hidden rows but {labels.shape[0]} labels")
    if denominator is None:
        denominator = float((labels != IGNORE_INDEX).sum())
    return ChunkedLMHeadCE.apply(hidden, weight, labels, max(1, chunks), max(float(denominator), 1.0),
                                 ce_grad,
                                  fp32_logits)


def plain_lm_head_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unchunked baseline: full fp32 logits, then cross-entropy (what HF's loss does)."""
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)


class _ChunkedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mlp_fn, chunks: int, params: tuple, *flat_params):
        ctx.mlp_fn, ctx.chunks, ctx.params = mlp_fn, chunks, params
        ctx.save_for_backward(x)
        # backward replays the chunks with the same RNG draws (dropout inside the MLP, e.g. LoRA's)
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            return torch.cat([mlp_fn(part.contiguous()) for part in x.tensor_split(chunks, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            grad_x, grad_p = _replay_chunks(ctx.mlp_fn, ctx.chunks, x, grad_out, list(ctx.params),
                                            ctx.needs_input_grad[0])
        return (grad_x, None, None, None, *grad_p)  # apply() received exactly `params`, in this order


def _replay_chunks(mlp_fn, chunks: int, x, grad_out, params, need_x: bool):
    """Recompute the MLP one chunk at a time and backpropagate that chunk's slice of `grad_out`."""
    grad_x = torch.empty_like(x) if need_x else None
    grad_p = [torch.zeros_like(p) for p in params]
    offset = 0
    for part, g in zip(x.tensor_split(chunks, dim=-2), grad_out.tensor_split(chunks, dim=-2)):
        part = part.detach().contiguous().requires_grad_(need_x)  # GPT-2's Conv1D views its input
        with torch.enable_grad():
            inputs = ([part] if need_x else []) + params
            grads = list(torch.autograd.grad(mlp_fn(part), inputs, g, allow_unused=True)) if inputs else []
        if need_x:
            grad_x[..., offset:offset + part.shape[-2], :] = grads.pop(0)
        for acc, gp in zip(grad_p, grads):
            if gp is not None:
                acc += gp
        offset += part.shape[-2]
    return grad_x, grad_p


def mini_sequence_mlp(mlp: torch.nn.Module, chunks: int) -> torch.nn.Module:
    """Patch `mlp.forward` in place (parameter names, hence checkpoints, stay unchanged): same outputs
    and gradients, with activations for one of `chunks` sequence chunks alive at a time."""
    original = types.MethodType(type(mlp).forward, mlp)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.dim() < 2 or x.shape[-2] < 2 or chunks <= 1:
            return original(x)
        params = tuple(p for p in mlp.parameters() if p.requires_grad)
        return _ChunkedMLP.apply(x, original, min(chunks, x.shape[-2]), params, *params)

    mlp.forward = forward
    mlp.mini_sequence_chunks = chunks
    return mlp
