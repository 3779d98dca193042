"""RazorAttention (arXiv 2407.15891): retrieval heads keep the full KV cache, the rest keep sinks + a
recent buffer + one compensation token.

1. `head_scores`: the repeated-random-token probe. A block of `block` random token ids repeated
   `repeats` times (official: 2500 x 4 from ids [10000, 12500); scaled by config for small models); per
   head, the echo score = mean attention from a token in repeats 2.. to earlier copies of itself, the
   induction score = mean attention to the tokens that followed those copies; a KV head scores the max
   over its query heads (`max_every_group`).
2. `retrieval_heads`: top `induction_fraction` (0.14) of KV heads by induction score, union top
   `echo_fraction` (0.01), ranked globally across layers; at least one head each.
3. `RazorCache`: prefill with full attention, then every non-retrieval KV head keeps `sinks` tokens, the
   most recent max(S0, N / C) tokens (N = prompt length) and one compensation token (mean key, mean value
   of the n_d dropped tokens) whose logit gets + log n_d, i.e. it counts as n_d identical tokens (paper
   eq. 5). Decoding keeps that size: each new token pushes the oldest non-sink token into the
   compensation token's running mean. Keys are stored after RoPE, so positions never change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.decoding import FullAttention, Rope, attention


@dataclass(frozen=True)
class RazorConfig:
    induction_fraction: float = 0.14
    echo_fraction: float = 0.01
    sinks: int = 4
    min_buffer: int = 4096  # S0
    compression: float = 5.0  # C
    compensation: bool = True


@torch.no_grad()
def head_scores(model, block: int, repeats: int, low: int, high: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(induction, echo) scores, each [layers, kv_heads], from one eager forward pass over the probe."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(low, high, (block,), generator=gen).repeat(repeats)
    ids = torch.cat([torch.tensor([model.config.bos_token_id or 0]), tokens])[None]
    out = model(input_ids=ids, output_attentions=True)
    i = torch.arange(1 + block, ids.shape[1])  # queries in repeats 2..
    induction, echo = [], []
    for att in out.attentions:  # [1, Hq, T, T]
        a = att[0].float()
        copies = [i - r * block for r in range(1, repeats) if r * block <= i.max()]
        echo_h = sum(torch.where(c >= 1, a[:, i, c.clamp(min=1)], 0) for c in copies)
        induction_h = sum(torch.where(c >= 1, a[:, i, (c + 1).clamp(max=ids.shape[1] - 1)], 0) for c in copies)
        echo.append(echo_h.mean(-1))
        induction.append(induction_h.mean(-1))
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    def per_kv(x):
        return torch.stack(x).view(len(x), -1, groups).amax(-1)
    return per_kv(induction), per_kv(echo)


def retrieval_heads(induction: torch.Tensor, echo: torch.Tensor, cfg: RazorConfig) -> torch.Tensor:
    """Boolean [layers, kv_heads]: top fraction by induction (global ranking) union top fraction by echo.

    Counts are rounded: at least one induction head is kept, but the echo share may round to none (1 % of a
    tiny model's 9 KV heads is 0.09 heads; forcing one would keep 11 % of the heads for a 1 % rule, and
    measured on tiny-retrieval it only cost KV: needle accuracy 0.975 with or without the extra head)."""
    n = induction.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[induction.flatten().topk(max(1, round(cfg.induction_fraction * n))).indices] = True
    mask[echo.flatten().topk(round(cfg.echo_fraction * n)).indices] = True
    return mask.view_as(induction)


def attention_impl(device: torch.device):
    """The Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if device.type == "cuda":
        from kernels.biased_attention import biased_attention

        return biased_attention
    return attention


def compensated_attention(q, keys, values, n_dropped, comp_key, comp_value, q_pos=None, k_pos=None, attn=None):
    """Attention over kept keys plus one compensation key worth `n_dropped` tokens (bias log n_d).

    q [B, Hq, Tq, D]; keys/values [B, Hkv, Tk, D]; n_dropped [Hkv] (0 = no compensation token)."""
    bias = torch.zeros(keys.shape[0], keys.shape[1], keys.shape[2] + 1, device=q.device)
    bias[:, :, 0] = torch.where(n_dropped > 0, n_dropped.clamp(min=1).float().log(), float("-inf"))
    k = torch.cat([comp_key[:, :, None], keys], 2)
    v = torch.cat([comp_value[:, :, None], values], 2)
    if q_pos is not None:
        k_pos = torch.cat([k_pos.new_full((1,), -1), k_pos])
    return (attn or attention_impl(q.device))(q, k, v, bias, q_pos, k_pos)


class RazorCache:
    """KV-cache policy for `kernels.decoding.forward`: full attention during prefill, then compression."""

    def __init__(self, model, heads: torch.Tensor, cfg: RazorConfig):
        self.rope, self.heads, self.cfg = Rope(model), heads, cfg
        self.prefill = FullAttention(model)  # the prompt runs with full attention and a full cache
        self.compressed: dict[int, list[dict]] = {}

    def attend(self, layer: int, q, k, v, positions):
        if layer not in self.compressed:
            return self.prefill.attend(layer, q, k, v, positions)
        k, q = self.rope(k, positions), self.rope(q, positions)
        # token by token, so a teacher-forced chunk sees exactly the caches of step-by-step decoding
        return torch.cat([self._decode_one(layer, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                           positions[t:t + 1]) for t in range(q.shape[2])], 2)

    def _decode_one(self, layer: int, q, k, v, position):
        groups = q.shape[1] // k.shape[1]
        outs = []
        for h, head in enumerate(self.compressed[layer]):
            head["k"] = torch.cat([head["k"], k[:, h:h + 1]], 2)
            head["v"] = torch.cat([head["v"], v[:, h:h + 1]], 2)
            head["pos"] = torch.cat([head["pos"], position])
            self._evict(head)
            outs.append(compensated_attention(q[:, h * groups:(h + 1) * groups], head["k"], head["v"],
                                              head["n_dropped"], head["ck"], head["cv"], position, head["pos"]))
        return torch.cat(outs, 1)

    def _evict(self, head: dict) -> None:
        """Keep a non-retrieval head at sinks + buffer: the oldest non-sink token leaves, folded into the
        compensation token's running mean (n_d grows by one), as if compressed with everything else."""
        sinks = self.cfg.sinks
        while head["buffer"] is not None and head["k"].shape[2] > sinks + head["buffer"]:
            old_k, old_v = head["k"][:, :, sinks], head["v"][:, :, sinks]
            keep = torch.cat([torch.arange(sinks), torch.arange(sinks + 1, head["k"].shape[2])])
            head["k"], head["v"], head["pos"] = head["k"][:, :, keep], head["v"][:, :, keep], head["pos"][keep]
            if self.cfg.compensation:
                n = head["n_dropped"].to(old_k.dtype)
                head["ck"] = (head["ck"] * n + old_k) / (n + 1)
                head["cv"] = (head["cv"] * n + old_v) / (n + 1)
                head["n_dropped"] = head["n_dropped"] + 1

    def after_prefill(self) -> None:
        """Compress every non-retrieval head of every layer (called once, after the prompt)."""
        full = self.prefill
        for layer in list(full.k):
            k, v, pos = full.k.pop(layer), full.v.pop(layer), full.pos.pop(layer)
            self.compressed[layer] = [self._compress(k[:, h:h + 1], v[:, h:h + 1], pos, bool(self.heads[layer, h]))
                                      for h in range(k.shape[1])]

    def _compress(self, k, v, pos, retrieval: bool) -> dict:
        n, cfg = k.shape[2], self.cfg
        buffer = max(cfg.min_buffer, math.ceil(n / cfg.compression))
        zero = torch.zeros(1, dtype=torch.long)
        if retrieval or n <= cfg.sinks + buffer:  # a short head is compressed once decoding outgrows it
            return {"k": k, "v": v, "pos": pos, "n_dropped": zero, "ck": k[:, :, 0] * 0, "cv": v[:, :, 0] * 0,
                    "buffer": None if retrieval else buffer}
        keep = torch.cat([torch.arange(cfg.sinks), torch.arange(n - buffer, n)])
        dropped = torch.arange(cfg.sinks, n - buffer)
        n_d = torch.tensor([len(dropped) if cfg.compensation else 0])
        return {"k": k[:, :, keep], "v": v[:, :, keep], "pos": pos[keep], "n_dropped": n_d,
                "ck": k[:, :, dropped].mean(2), "cv": v[:, :, dropped].mean(2), "buffer": buffer}

    def cache_bytes(self) -> int:
        """Bytes actually held: kept tokens (+1 compensation token where used), keys and values."""
        total = 0
        for heads in self.compressed.values():
            for h in heads:
                tokens = h["k"].shape[2] + int(h["n_dropped"].item() > 0)
                total += 2 * tokens * h["k"].shape[-1] * h["k"].element_size() * h["k"].shape[0]
        return total + self.prefill.cache_bytes()
