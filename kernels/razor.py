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

import torch
from tracecore.kernels.decoding import FullAttention, Growing, Rope, attention, fast_attention
from tracecore.kernels.settings import RazorConfig


@torch.no_grad()
def head_scores(model, block: int, repeats: int, low: int, high: int,
                seed: int = 0) -> tuple[torch.Tensor, ...]:
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
        induction_h = sum(torch.where(c >= 1, a[:, i, (c + 1).clamp(max=ids.shape[1] - 1)], 0)
                          for c in copies)
        echo.append(echo_h.mean(-1))
        induction.append(induction_h.mean(-1))
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    def per_kv(x):
        return torch.stack(x).view(len(x), -1, groups).amax(-1)
    return per_kv(induction), per_kv(echo)


def retrieval_heads(induction: torch.Tensor, echo: torch.Tensor, cfg: RazorConfig) -> torch.Tensor:
    """Boolean [layers, kv_heads]: top fraction by induction (global ranking) union top fraction by echo.

    Counts are rounded: at least one induction head is kept, but the echo share may round to none (1 % of a
    tiny model's 9 KV heads is 0.09 heads; forcing one would keep 11 % of the heads for a 1 % rule, and on
    tiny-retrieval it only cost KV bytes, not accuracy)."""
    n = induction.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[induction.flatten().topk(max(1, round(cfg.induction_fraction * n))).indices] = True
    mask[echo.flatten().topk(round(cfg.echo_fraction * n)).indices] = True
    return mask.view_as(induction)


def attention_impl(device: torch.device):
    """The Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if device.type == "cuda":
        from tracecore.kernels.biased_attention import biased_attention

        return biased_attention
    return attention


def compensated_attention(q, keys, values, n_dropped, comp_key, comp_value, q_pos=None, k_pos=None,
                          attn=None):
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

    After the prompt each layer holds two groups of KV heads: the retrieval heads (a growing full cache,
    fused SDPA like `FullAttention`) and the compressed heads, which all share the prompt length, hence
    the buffer and the eviction schedule. The compressed group is one fixed-size tensor per layer: slot 0
    the compensation token (its logit bias log n_d), then the sinks, then the buffer as a ring: a decoded
    token overwrites the oldest non-sink token, which is first folded into the compensation mean. Keys are
    stored after RoPE and a decoded query sees every kept key, so slot order does not matter, and a step
    costs two attention calls per layer and no copy of the cache."""

    def __init__(self, model, heads: torch.Tensor, cfg: RazorConfig, prefilled: FullAttention | None = None):
        """`prefilled`: a full-attention cache that already holds the prompt (shared prefill), else a new
        one."""
        self.rope, self.heads, self.cfg = Rope(model), heads, cfg
        self.groups = model.config.num_attention_heads // model.config.num_key_value_heads
        # the prompt runs with full attention and a full cache
        self.prefill = prefilled or FullAttention(model)
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
        caches = self.compressed[layer]
        retrieval, compressed = caches.get("retrieval"), caches.get("compressed")
        if retrieval is not None:
            for key, new in (("k", k[:, retrieval["kv"]]), ("v", v[:, retrieval["kv"]]), ("pos", position)):
                retrieval[key] = retrieval["growing"][key].append(new)
            out[:, retrieval["q"]] = fast_attention(q[:, retrieval["q"]], retrieval["k"], retrieval["v"])
        if compressed is not None:
            self._push(compressed, k[:, compressed["kv"]], v[:, compressed["kv"]], position)
            out[:, compressed["q"]] = attention_impl(q.device)(q[:, compressed["q"]], compressed["k"],
                                                               compressed["v"], compressed["bias"])
        return out

    def _slot(self, group: dict) -> int:
        """Where the next token goes: the next free slot, else the ring's oldest (evicted first)."""
        if group["filled"] < group["k"].shape[2]:
            group["filled"] += 1
            return group["filled"] - 1
        slot = 1 + self.cfg.sinks + group["ring"]
        group["ring"] = (group["ring"] + 1) % group["buffer"]
        if self.cfg.compensation:
            n = group["n_dropped"]
            group["ck"].mul_(n / (n + 1)).add_(group["k"][:, :, slot].float() / (n + 1))
            group["cv"].mul_(n / (n + 1)).add_(group["v"][:, :, slot].float() / (n + 1))
            group["n_dropped"] = n + 1
            self._write_compensation(group)
        return slot

    def _push(self, group: dict, k, v, position) -> None:
        slot = self._slot(group)
        group["k"][:, :, slot], group["v"][:, :, slot] = k[:, :, 0], v[:, :, 0]
        group["pos"][slot] = position[0]
        group["bias"][:, :, slot] = 0.0

    @staticmethod
    def _write_compensation(group: dict) -> None:
        n = group["n_dropped"]
        group["k"][:, :, 0], group["v"][:, :, 0] = group["ck"], group["cv"]
        group["bias"][:, :, 0] = math.log(n) if n > 0 else float("-inf")

    def after_prefill(self) -> None:
        """Split every layer's cache into its retrieval and compressed heads and compress the latter (called
        once, after the prompt)."""
        full = self.prefill
        for layer in list(full.cache):
            k, v, pos = full.pop(layer)
            retrieval = self.heads[layer].tolist()
            members = {"retrieval": [h for h, r in enumerate(retrieval) if r],
                       "compressed": [h for h, r in enumerate(retrieval) if not r]}
            self.compressed[layer] = {name: (self._full(k, v, pos, m) if name == "retrieval" else
                                             self._compress(k, v, pos, m)) for name, m in members.items()
                                                 if m}

    def _heads(self, members: list[int], device) -> dict:
        return {"kv": torch.tensor(members, device=device),
                "q": torch.tensor([h * self.groups + g for h in members for g in range(self.groups)],
                                  device=device)}

    def _full(self, k, v, pos, members: list[int]) -> dict:
        group = self._heads(members, k.device)
        group |= {"k": k[:, group["kv"]], "v": v[:, group["kv"]], "pos": pos.clone(), "n_dropped": 0}
        growing = {"k": Growing(group["k"], 2), "v": Growing(group["v"], 2), "pos": Growing(group["pos"], 0)}
        return group | {"growing": growing}  # decoded tokens are appended in place, not concatenated

    def _compress(self, k, v, pos, members: list[int]) -> dict:
        """Slot 0 compensation, then sinks + the most recent buffer tokens (the prompt's, in order)."""
        group = self._heads(members, k.device)
        k, v = k[:, group["kv"]], v[:, group["kv"]]
        (b, heads, n, d), cfg = k.shape, self.cfg
        buffer = max(cfg.min_buffer, math.ceil(n / cfg.compression))
        keep = torch.arange(n, device=k.device)
        if n > cfg.sinks + buffer:
            keep = torch.cat([keep[:cfg.sinks], keep[n - buffer:]])
        dropped = n - len(keep)
        capacity = 1 + cfg.sinks + buffer
        group |= {"k": k.new_zeros(b, heads, capacity, d), "v": v.new_zeros(b, heads, capacity, d),
                  "pos": torch.full((capacity,), -1, device=k.device, dtype=pos.dtype),
                  "bias": torch.full((1, heads, capacity), float("-inf"), device=k.device),
                  "filled": 1 + len(keep), "ring": 0, "buffer": buffer,
                  "n_dropped": dropped if cfg.compensation else 0,
                  "ck": k[:, :, cfg.sinks:n - buffer].float().mean(2) if dropped
                      else k.new_zeros(b, heads, d).float(),
                  "cv": v[:, :, cfg.sinks:n - buffer].float().mean(2) if dropped
                      else v.new_zeros(b, heads, d).float()}
        group["k"][:, :, 1:1 + len(keep)], group["v"][:, :, 1:1 + len(keep)] = k[:, :, keep], v[:, :, keep]
        group["pos"][1:1 + len(keep)] = pos[keep]
        group["bias"][:, :, 1:1 + len(keep)] = 0.0
        self._write_compensation(group)
        return group

    def head(self, layer: int, kv_head: int) -> dict:
        """One KV head's kept tokens in position order (k, v, pos), n_dropped and the compensation token (ck,
        cv), for inspection and tests."""
        for group in self.compressed[layer].values():
            members = group["kv"].tolist()
            if kv_head in members:
                j = members.index(kv_head)
                order = (group["pos"] >= 0).nonzero()[:, 0]
                order = order[group["pos"][order].argsort()]
                ck = group.get("ck", group["k"][:, :, 0].float() * 0)
                cv = group.get("cv", group["v"][:, :, 0].float() * 0)
                return {"k": group["k"][:, j:j + 1, order], "v": group["v"][:, j:j + 1, order],
                        "pos": group["pos"][order], "n_dropped": group["n_dropped"],
                        "ck": ck[:, j:j + 1], "cv": cv[:, j:j + 1]}
        raise KeyError(f"layer {layer} has no KV head {kv_head}")

    def cache_bytes(self) -> int:
        """Bytes actually held: kept tokens (+1 compensation token where used), keys and values."""
        total = 0
        for groups in self.compressed.values():
            for g in groups.values():
                tokens = int((g["pos"] >= 0).sum()) + int(g["n_dropped"] > 0)
                k = g["k"]
                total += 2 * tokens * k.shape[-1] * k.element_size() * k.shape[0] * k.shape[1]
        return total + self.prefill.cache_bytes()
