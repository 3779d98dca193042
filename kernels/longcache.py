"""LongCache / ReAttention (arXiv 2407.15176): full-context cache selection with a finite attention scope.

Every token's key and value are kept, *un-rotated*. Each attention call (a prefill chunk or a decode
step) sees only: the first `global_size` sink tokens, the `local_size` most recent tokens, and spans of
`span_size` tokens around the middle tokens that score highest by position-agnostic relevance
(q . k without RoPE, averaged over the query heads of each KV group; top-`mid_size` per query, union over
the chunk's queries, heads and groups, the `recall_clip` most frequent kept). The gathered tokens get
contiguous positions 0..n-1 in their original order, RoPE is applied with those positions, and
ordinary causal attention runs. Positions never exceed `scope()`, so the model never sees a position
it was not trained on. Defaults are the official `LightCacheConfig` values (32 / 4096 / 1 / 32, clip -1);
the eval config scales them to a small model's trained length.

Deviation: the official code shrinks the local window so the middle segment is a multiple of 128 (a
kernel alignment detail); we keep `local_size` exactly.
"""

from __future__ import annotations

import torch
from tracecore.kernels.decoding import Rope, attention
from tracecore.kernels.settings import LongCacheConfig


def select_middle(scores: torch.Tensor, mid_size: int, recall_clip: int) -> torch.Tensor:
    """Indices into the middle segment: top-`mid_size` per query row of `scores` [rows, M], union over
    rows, optionally clipped to the `recall_clip` most often selected."""
    top = scores.topk(min(mid_size, scores.shape[-1]), dim=-1).indices.flatten()
    picked, counts = top.unique(return_counts=True)
    if 0 < recall_clip < len(picked):
        keep = counts.argsort(descending=True, stable=True)[:recall_clip]
        picked = picked[keep]
    return picked.sort().values


def expand_spans(centres: torch.Tensor, span: int, start: int, stop: int) -> torch.Tensor:
    """Each centre j -> [j - span/2, j + span/2), clamped to [start, stop), deduplicated and sorted."""
    if len(centres) == 0:
        return centres
    offsets = torch.arange(-(span // 2), span - span // 2, device=centres.device)
    idx = (centres[:, None] + start + offsets[None, :]).flatten().clamp(start, stop - 1)
    return idx.unique()


class LongCache:
    """KV-cache policy for `kernels.decoding.forward` (see module docstring)."""

    def __init__(self, model, cfg: LongCacheConfig):
        self.rope, self.cfg = Rope(model), cfg
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.max_position = -1  # largest position id ever passed to RoPE (tests check the scope)

    def gather_index(self, q: torch.Tensor, k_all: torch.Tensor, n_new: int) -> torch.Tensor:
        cfg, total = self.cfg, k_all.shape[2]
        mid_start, mid_stop = cfg.global_size, total - n_new - cfg.local_size
        if mid_stop <= mid_start:
            return torch.arange(total, device=q.device)
        groups = q.shape[1] // k_all.shape[1]
        b, _hq, t, d = q.shape
        grouped = q.float().view(b, k_all.shape[1], groups, t, d).mean(2)  # group_unique: mean over the group
        scores = grouped @ k_all[:, :, mid_start:mid_stop].float().transpose(-1, -2)  # [B, Hkv, T, M]
        centres = select_middle(scores.reshape(-1, scores.shape[-1]), cfg.mid_size, cfg.recall_clip)
        spans = expand_spans(centres, cfg.span_size, mid_start, mid_stop)
        head = torch.arange(mid_start, device=q.device)
        tail = torch.arange(mid_stop, total, device=q.device)
        return torch.cat([head, spans, tail])

    def attend(self, layer: int, q, k, v, positions):
        self.k[layer] = torch.cat([self.k[layer], k], 2) if layer in self.k else k
        self.v[layer] = torch.cat([self.v[layer], v], 2) if layer in self.v else v
        k_all, v_all = self.k[layer], self.v[layer]
        idx = self.gather_index(q, k_all, q.shape[2])
        new_pos = torch.arange(len(idx), device=q.device)  # contiguous positions for what is attended
        q_pos = new_pos[-q.shape[2]:]  # the chunk's own tokens are the tail of the gathered set
        self.max_position = max(self.max_position, int(new_pos[-1]))
        keys = self.rope(k_all[:, :, idx], new_pos)
        return attention(self.rope(q, q_pos), keys, v_all[:, :, idx], None, q_pos, new_pos)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())
