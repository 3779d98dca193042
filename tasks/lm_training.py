"""The causal-LM training loop and its data plumbing, shared by pretraining and the eval stage's retrieval
curriculum: the token stream of a tokens artifact, fixed-length blocks with an eval split, the bootstrap
Llama, the eval loss and the AdamW loop (a library module, so both stages fingerprint it).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import Field, model_validator
from tracecore.configs.base import Strict
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.common import Progress


class TrainSchedule(Strict):
    """The training loop's settings: one type for pretraining and eval's retrieval curriculum, so neither
    stage reaches the other's config."""

    seq_len: int = Field(256, ge=16, le=131_072)
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(1_000_000, ge=1, description="training tokens (stops early when the corpus ends)")
    lr: float = Field(3e-3, gt=0, lt=1)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after the linear warm-up")
    epochs: float = Field(1.0, gt=0, le=1000, description="passes over the corpus (max_tokens still caps)")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    seed: int = 0


class ModelShape(Strict):
    """The bootstrap Llama's shape."""

    hidden_size: int = Field(128, ge=16, le=8192)
    layers: int = Field(2, ge=1, le=128)
    heads: int = Field(4, ge=1, le=128)
    kv_heads: int = Field(2, ge=1, le=128)
    intermediate_size: int = Field(384, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must be divisible by heads, and heads by kv_heads")
        return self


def token_stream(store: ArtifactStore, tokens_ref: str, separator: list[int]) -> np.ndarray:
    """All documents concatenated in shard order, each followed by `separator` ([EOS]: standard LM
    packing)."""
    pieces, sep = [], np.asarray(separator, dtype=np.int64)
    for m in store.markers(tokens_ref):
        for ids in store.read_shard(tokens_ref, m["shard"],
                                    columns=["tokens"]).column(0).to_numpy(zero_copy_only=False):
            pieces += [np.asarray(ids, dtype=np.int64), sep]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def split_blocks(stream: np.ndarray, seq_len: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_blocks = len(stream) // seq_len
    if n_blocks < 2:
        raise ValueError(f"pretrain: corpus has {len(stream)} tokens, fewer than 2 blocks of "
                         f"seq_len={seq_len}")
    blocks = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    n_eval = max(1, int(n_blocks * eval_fraction))
    return blocks[:-n_eval], blocks[-n_eval:]


def build_model(cfg: ModelShape, vocab_size: int, eos_id: int, pad_id: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         intermediate_size=cfg.intermediate_size,
                         max_position_embeddings=max(2048, cfg.seq_len),
                         tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
                         pad_token_id=pad_id)
    return LlamaForCausalLM(config)


def eval_loss(model, blocks: np.ndarray, batch_size: int, device: str) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = torch.as_tensor(blocks[i:i + batch_size], device=device)
            losses.append(model(input_ids=x, labels=x).loss.item() * len(x))
    model.train()
    return sum(losses) / len(blocks)


def corpus_coverage(train_tokens: int, train_block_tokens: int, corpus_tokens: int) -> dict:
    """How much of the tokenized (= indexed) corpus the model saw: the memorization stage correlates the model
    with counts over the whole index, so a model trained on part of it is named as such. Blocks are drawn
    without repetition until an epoch ends; the eval split is never trained on."""
    seen = min(train_tokens, train_block_tokens)
    return {"corpus_tokens": int(corpus_tokens), "corpus_tokens_seen": int(seen),
            "corpus_share_seen": round(seen / max(corpus_tokens, 1), 4)}


def train(model, train_blocks: np.ndarray, cfg: TrainSchedule, device: str, log,
          name: str = "pretrain") -> list[dict]:
    """AdamW, warm-up then cosine (or constant) rate, `epochs` passes capped at `max_tokens`; returns the
    curve.

    A constant rate is there for induction-head formation (`configs/tiny-retrieval.yaml`): in our runs a
    rate decaying to zero ended training inside the loss plateau that precedes them. `name` labels the
    progress artifact and log lines (the eval stage's retrieval curriculum trains with this loop too)."""
    import torch
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    steps = max(1, int(min(cfg.max_tokens, cfg.epochs * train_blocks.size)) // (cfg.batch_size * cfg.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = min(cfg.warmup_steps, steps // 10)
    sched = (get_constant_schedule_with_warmup(opt, warmup) if cfg.schedule == "constant"
             else get_cosine_schedule_with_warmup(opt, warmup, steps))
    order = np.random.default_rng(cfg.seed).permutation(len(train_blocks))
    curve, start = [], time.perf_counter()
    model.train()
    progress = Progress(name, steps, unit="step")  # terminal bar + the Prefect progress artifact
    for step in range(steps):
        idx = order[(step * cfg.batch_size + np.arange(cfg.batch_size)) % len(order)]
        x = torch.as_tensor(train_blocks[idx], device=device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "tokens": (step + 1) * x.numel(), "loss": float(loss.item()),
                      "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - start})
        progress.step()
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("%s step %d/%d loss %.3f (%.0f tokens/s)", name, step + 1, steps, curve[-1]["loss"],
                     curve[-1]["tokens"] / curve[-1]["seconds"])
    progress.close()
    return curve
