"""Stage `pretrain`: the bootstrap model, a tiny Llama-architecture causal LM trained on the token shards.

Later stages load any HF causal LM by local path; this stage either trains the tiny model
(embedded default) or registers the user's model folder (`pretrain.model_path`) without copying it.
The result is a Hugging Face folder (config, safetensors weights, tokenizer) plus a loss-curve shard.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from tracecore.configs.schema import PretrainConfig
from tracecore.storage.lineage import code_version, lineage
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.common import Progress, already_committed, get_logger, plan_ref, stage_task


class ModelPathError(ValueError):
    pass


def plan_pretrain(cfg: PretrainConfig, tokens_ref: str, tokenizer_ref: str) -> dict[str, str]:

    inputs = {"tokens": tokens_ref, "tokenizer": tokenizer_ref}
    if cfg.model_path:
        inputs = {"model_path": str(Path(cfg.model_path).resolve()), "tokenizer": tokenizer_ref}
    return {"model": plan_ref("model", "pretrain", cfg.fingerprint(), inputs, __name__)}


def token_stream(store: ArtifactStore, tokens_ref: str, separator: list[int]) -> np.ndarray:
    """All documents concatenated in shard order, each followed by `separator` ([EOS]: standard LM packing)."""
    pieces, sep = [], np.asarray(separator, dtype=np.int64)
    for m in store.markers(tokens_ref):
        for ids in store.read_shard(tokens_ref, m["shard"], columns=["tokens"]).column(0).to_numpy(zero_copy_only=False):
            pieces += [np.asarray(ids, dtype=np.int64), sep]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def split_blocks(stream: np.ndarray, seq_len: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_blocks = len(stream) // seq_len
    if n_blocks < 2:
        raise ValueError(f"pretrain: corpus has {len(stream)} tokens, fewer than 2 blocks of seq_len={seq_len}")
    blocks = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    n_eval = max(1, int(n_blocks * eval_fraction))
    return blocks[:-n_eval], blocks[-n_eval:]


def build_model(cfg: PretrainConfig, vocab_size: int, eos_id: int, pad_id: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         intermediate_size=cfg.intermediate_size, max_position_embeddings=max(2048, cfg.seq_len),
                         tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
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


def train(model, train_blocks: np.ndarray, cfg: PretrainConfig, device: str, log, name: str = "pretrain") -> list[dict]:
    """AdamW, warm-up then cosine (or constant) rate, `epochs` passes capped at `max_tokens`; returns the curve.

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


def register_user_model(store: ArtifactStore, cfg: PretrainConfig, tokenizer_ref: str, ref: str, record: dict) -> None:
    from transformers import AutoConfig

    folder = Path(cfg.model_path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelPathError(f"pretrain.model_path: {cfg.model_path!r} is not a Hugging Face model folder "
                             "(config.json missing)")
    if not list(folder.glob("*.safetensors")):
        raise ModelPathError(f"pretrain.model_path: {cfg.model_path!r} has no *.safetensors weights "
                             "(pickled .bin weights are refused)")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    store.commit(ref, {**record, "external_path": str(folder.resolve()), "model_type": config.model_type})


def run_pretrain(store_uri: str, cfg: PretrainConfig, tokens_ref: str, tokenizer_ref: str, refs: dict[str, str],
                 address: str | None = None) -> dict[str, str]:
    import torch
    from tracecore.tasks.gradients import resolve_device
    from transformers import AutoTokenizer

    store, log, ref = ArtifactStore(store_uri), get_logger(), refs["model"]
    with store.lock(ref):
        if already_committed(store, "pretrain", ref):
            return refs
        record = lineage("pretrain", cfg.fingerprint(), {"tokens": tokens_ref, "tokenizer": tokenizer_ref},
                         code_version(__name__))
        if cfg.model_path:
            register_user_model(store, cfg, tokenizer_ref, ref, record)
            return refs
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        with store.local_dir(tokenizer_ref) as tok_dir:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True, trust_remote_code=False)
        train_blocks, eval_blocks = split_blocks(token_stream(store, tokens_ref, [tokenizer.eos_token_id]),
                                                 cfg.seq_len, cfg.eval_fraction)
        model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id).to(device)
        if cfg.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        initial = eval_loss(model, eval_blocks, cfg.batch_size, device)
        curve = train(model, train_blocks, cfg, device, log)
        final = eval_loss(model, eval_blocks, cfg.batch_size, device)
        with tempfile.TemporaryDirectory(prefix="tracecore-model-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            store.put_dir(ref, tmp)
        store.write_shard(ref, 0, pa.Table.from_pylist(curve))
        seconds = curve[-1]["seconds"]
        stats = {"parameters": sum(p.numel() for p in model.parameters()), "steps": len(curve),
                 "train_tokens": curve[-1]["tokens"], "tokens_per_second": round(curve[-1]["tokens"] / seconds, 1),
                 "eval_loss_initial": round(initial, 4), "eval_loss": round(final, 4),
                 "eval_perplexity": round(math.exp(min(final, 50)), 3), "seconds": round(seconds, 2), "device": device}
        store.commit(ref, {**record, **stats}, expected_shards=1)
        log.info("pretrain: %d params, eval loss %.3f -> %.3f in %.0fs", stats["parameters"], initial, final, seconds)
    return refs


def model_dir(store: ArtifactStore, model_ref: str):
    """Context manager yielding a local HF folder for a model artifact (trained here or registered by path)."""
    import contextlib

    external = store.manifest(model_ref).get("external_path")
    return contextlib.nullcontext(external) if external else store.local_dir(model_ref)


pretrain_task = stage_task(run_pretrain, "pretrain")
