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

from kernels.decoding import FullAttention, Rope, attention, fast_attention


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
    """KV-cache policy for `kernels.decoding.forward`: full attention during prefill, then compression.

    After the prompt each layer holds two groups of KV heads, each one tensor: the retrieval heads (full
    cache, fused SDPA like `FullAttention`) and the compressed heads (sinks + buffer + compensation token,
    the Triton biased-attention kernel on CUDA). All compressed heads of a layer share the prompt length,
    hence the buffer and the eviction schedule, so each decoded token costs two attention calls per layer,
    not one per head."""

    def __init__(self, model, heads: torch.Tensor, cfg: RazorConfig):
        self.rope, self.heads, self.cfg = Rope(model), heads, cfg
        self.groups = model.config.num_attention_heads // model.config.num_key_value_heads
        self.prefill = FullAttention(model)  # the prompt runs with full attention and a full cache
        self.compressed: dict[int, dict[str, dict]] = {}  # layer -> {"retrieval": group, "compressed": group}

    def attend(self, layer: int, q, k, v, positions):
        if layer not in self.compressed:
            return self.prefill.attend(layer, q, k, v, positions)
        k, q = self.rope(k, positions), self.rope(q, positions)
        # token by token, so a teacher-forced chunk sees exactly the caches of step-by-step decoding
        return torch.cat([self._decode_one(layer, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                           positions[t:t + 1]) for t in range(q.shape[2])], 2)

    def _decode_one(self, layer: int, q, k, v, position):
        out = torch.empty_like(q)
        for name, group in self.compressed[layer].items():
            group["k"] = torch.cat([group["k"], k[:, group["kv"]]], 2)
            group["v"] = torch.cat([group["v"], v[:, group["kv"]]], 2)
            group["pos"] = torch.cat([group["pos"], position])
            queries = q[:, group["q"]]
            if name == "retrieval":
                out[:, group["q"]] = fast_attention(queries, group["k"], group["v"], position, group["pos"])
                continue
            self._evict(group)
            n_dropped = torch.full((len(group["kv"]),), group["n_dropped"], device=q.device)
            out[:, group["q"]] = compensated_attention(queries, group["k"], group["v"], n_dropped, group["ck"],
                                                       group["cv"], position, group["pos"])
        return out

    def _evict(self, group: dict) -> None:
        """Keep the compressed heads at sinks + buffer: the oldest non-sink token leaves, folded into the
        compensation token's running mean (n_d grows by one), as if compressed with everything else."""
        sinks = self.cfg.sinks
        while group["k"].shape[2] > sinks + group["buffer"]:
            old_k, old_v = group["k"][:, :, sinks], group["v"][:, :, sinks]
            for key in ("k", "v"):
                group[key] = torch.cat([group[key][:, :, :sinks], group[key][:, :, sinks + 1:]], 2)
            group["pos"] = torch.cat([group["pos"][:sinks], group["pos"][sinks + 1:]])
            if self.cfg.compensation:
                n = group["n_dropped"]
                group["ck"] = (group["ck"] * n + old_k) / (n + 1)
                group["cv"] = (group["cv"] * n + old_v) / (n + 1)
                group["n_dropped"] = n + 1

    def after_prefill(self) -> None:
        """Split every layer's cache into its retrieval and compressed heads and compress the latter (called
        once, after the prompt)."""
        full = self.prefill
        for layer in list(full.k):
            k, v, pos = full.k.pop(layer), full.v.pop(layer), full.pos.pop(layer)
            retrieval = self.heads[layer].tolist()
            groups = {}
            for name, members in (("retrieval", [h for h, r in enumerate(retrieval) if r]),
                                  ("compressed", [h for h, r in enumerate(retrieval) if not r])):
                if members:
                    groups[name] = self._group(k, v, pos, members, name == "retrieval")
            self.compressed[layer] = groups

    def _group(self, k, v, pos, members: list[int], retrieval: bool) -> dict:
        kv = torch.tensor(members, device=k.device)
        q = torch.tensor([h * self.groups + g for h in members for g in range(self.groups)], device=k.device)
        k, v = k[:, kv], v[:, kv]
        n, cfg = k.shape[2], self.cfg
        group = {"kv": kv, "q": q, "k": k, "v": v, "pos": pos, "n_dropped": 0, "ck": k[:, :, 0] * 0,
                 "cv": v[:, :, 0] * 0, "buffer": max(cfg.min_buffer, math.ceil(n / cfg.compression))}
        if retrieval or n <= cfg.sinks + group["buffer"]:  # a short group is compressed once decoding outgrows it
            return group
        keep = torch.cat([torch.arange(cfg.sinks), torch.arange(n - group["buffer"], n)]).to(k.device)
        dropped = slice(cfg.sinks, n - group["buffer"])
        group.update(k=k[:, :, keep], v=v[:, :, keep], pos=pos[keep], ck=k[:, :, dropped].mean(2),
                     cv=v[:, :, dropped].mean(2), n_dropped=(n - group["buffer"] - cfg.sinks) if cfg.compensation
                     else 0)
        return group

    def head(self, layer: int, kv_head: int) -> dict:
        """One KV head's view after the prompt (k, v, pos, n_dropped, ck, cv), for inspection and tests."""
        for group in self.compressed[layer].values():
            if kv_head in group["kv"].tolist():
                j = group["kv"].tolist().index(kv_head)
                return {"k": group["k"][:, j:j + 1], "v": group["v"][:, j:j + 1], "pos": group["pos"],
                        "n_dropped": group["n_dropped"], "ck": group["ck"][:, j:j + 1], "cv": group["cv"][:, j:j + 1]}
        raise KeyError(f"layer {layer} has no KV head {kv_head}")

    def cache_bytes(self) -> int:
        """Bytes actually held: kept tokens (+1 compensation token where used), keys and values."""
        total = 0
        for groups in self.compressed.values():
            for g in groups.values():
                tokens = g["k"].shape[2] + int(g["n_dropped"] > 0)
                total += 2 * tokens * g["k"].shape[-1] * g["k"].element_size() * g["k"].shape[0] * g["k"].shape[1]
        return total + self.prefill.cache_bytes()
