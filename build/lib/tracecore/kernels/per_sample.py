"""Exact per-sample gradients of LoRA parameters, batched (TAGCOS/LESS features), and the naive loop.

A LoRA factor is a bias-free Linear, so its per-sample weight gradient is sum_t grad_out[b, t] (x) input[b, t]
(the Opacus identity): hooks capture both in one backward pass of the summed per-sample losses. Torch only
(no pipeline imports), so `bench/gpu_check.sh` runs it on a machine with only PyTorch, transformers and peft.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(model, ids, labels, mask):
    """Mean response-token cross-entropy of each sample (what a batch-size-1 loop would compute).

    The LM head runs only on positions that predict a response token: prompts are most of a record,
    and the [tokens, vocab] logits dominate the cost of a small model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = base.get_output_embeddings()(hidden[keep]).float()
    tok_loss = F.cross_entropy(logits, target[keep], reduction="none")
    sums = torch.zeros(ids.shape[0], device=tok_loss.device, dtype=tok_loss.dtype)
    sums = sums.index_add(0, keep.nonzero()[:, 0], tok_loss)
    return sums / keep.sum(1).clamp(min=1)


class PerSampleGrads:
    """Hooks on every LoRA Linear: per-sample weight gradients from (input, grad_output) pairs."""

    def __init__(self, model):
        self.modules = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and (".lora_A." in n or ".lora_B." in n)]
        self.inputs, self.grads, self.handles = {}, {}, []
        for m in self.modules:
            self.handles.append(m.register_forward_hook(self._forward))

    def _forward(self, module, args, output):
        self.inputs[module] = args[0].detach()
        output.register_hook(lambda g, m=module: self.grads.__setitem__(m, g.detach()))

    def flat(self):
        """[batch, n_lora_params] in the order of `model.named_parameters()`."""
        parts = [torch.einsum("bto,bti->boi", self.grads[m].float(), self.inputs[m].float()).flatten(1)
                 for m in self.modules]
        return torch.cat(parts, dim=1)

    def close(self):
        for h in self.handles:
            h.remove()


def batched_grads(model, batch) -> object:
    """Exact per-sample gradients of the LoRA parameters for a padded batch, in one backward pass."""
    hooks = PerSampleGrads(model)
    try:
        per_sample_loss(model, *batch).sum().backward()
        return hooks.flat()
    finally:
        model.zero_grad(set_to_none=True)
        hooks.close()


def loop_grads(model, batch):
    """Reference: the naive batch-size-1 loop with the model's own loss, which the batched path must equal."""
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(batch[0].shape[0]):
        n = int(batch[2][i].sum())
        ids, labels, mask = (t[i:i + 1, :n] for t in batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)
