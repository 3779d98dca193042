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
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.common import MODEL_LOAD_LOCK, Progress
from tracecore.tasks.models import resolve_device, user_model_config
from tracecore.tasks.stage import Stage, StageRun


class ModelPathError(ValueError):
    pass


def pretrain_needs(pipeline_cfg) -> dict[str, str]:
    """A user's model reads no token shards; the bootstrap model trains on them."""
    tokens = {} if pipeline_cfg.pretrain.model_path else {"tokens": "tokenize.tokens"}
    return {**tokens, "tokenizer": "tokenize.tokenizer"}


def user_model(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """A user's model (folder, GGUF file or packaged model) is an input: checked to be a causal LM transformers
    knows before any work, fingerprinted by `model_fingerprint` (a GGUF is converted when the stage runs)."""
    from tracecore.tasks.gguf_models import is_gguf
    from tracecore.tasks.models import model_fingerprint

    path = pipeline_cfg.pretrain.model_path
    if not path:
        return {}, {}
    if not is_gguf(path):
        check_model_folder(path)
    user_model_config(pipeline_cfg)
    return model_fingerprint(path, "pretrain.model_path"), {}


def check_model_folder(path: str) -> Path:
    """A local Hugging Face folder with safetensors weights, checked when the run is planned (before any work)."""
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelPathError(f"pretrain.model_path: {path!r} is not a Hugging Face model folder "
                             "(config.json missing)")
    if not list(folder.glob("*.safetensors")):
        raise ModelPathError(f"pretrain.model_path: {path!r} has no *.safetensors weights "
                             "(pickled .bin weights are refused)")
    return folder.resolve()


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


def corpus_coverage(train_tokens: int, train_block_tokens: int, corpus_tokens: int) -> dict:
    """How much of the tokenized (= indexed) corpus the model saw: the memorization stage correlates the model
    with counts over the whole index, so a model trained on part of it is named as such. Blocks are drawn
    without repetition until an epoch ends; the eval split is never trained on."""
    seen = min(train_tokens, train_block_tokens)
    return {"corpus_tokens": int(corpus_tokens), "corpus_tokens_seen": int(seen),
            "corpus_share_seen": round(seen / max(corpus_tokens, 1), 4)}


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


def register_user_model(run: StageRun) -> None:
    """Record the user's model folder by path (not copied); later stages load it from there. A GGUF file is
    imported into the store once (`model_import/<fp>`) and the model artifact points at the import."""
    from tracecore.tasks.gguf_models import import_gguf, is_gguf
    from transformers import AutoConfig

    if is_gguf(run.cfg.model_path):
        ref = import_gguf(run.store, run.cfg.model_path, "pretrain.model_path", run.log)
        run.commit("model", {"imported": ref, "model_type": run.store.manifest(ref)["model_type"]})
        return
    folder = check_model_folder(run.cfg.model_path)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    run.commit("model", {"external_path": str(folder.resolve()), "model_type": config.model_type})


def run_pretrain(run: StageRun) -> None:
    import torch
    from transformers import AutoTokenizer

    store, cfg, log = run.store, run.cfg, run.log
    if cfg.model_path:
        register_user_model(run)
        return
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    with store.local_dir(run.inputs["tokenizer"]) as tok_dir:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True, trust_remote_code=False)
    stream = token_stream(store, run.inputs["tokens"], [tokenizer.eos_token_id])
    train_blocks, eval_blocks = split_blocks(stream, cfg.seq_len, cfg.eval_fraction)
    with MODEL_LOAD_LOCK:  # construction too: another thread's from_pretrained patches module init process-wide
        model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id).to(device)
    if cfg.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    initial = eval_loss(model, eval_blocks, cfg.batch_size, device)
    curve = train(model, train_blocks, cfg, device, log)
    final = eval_loss(model, eval_blocks, cfg.batch_size, device)
    with tempfile.TemporaryDirectory(prefix="tracecore-model-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        store.put_dir(run.ref("model"), tmp)
    store.write_shard(run.ref("model"), 0, pa.Table.from_pylist(curve))
    seconds = curve[-1]["seconds"]
    stats = {"parameters": sum(p.numel() for p in model.parameters()), "steps": len(curve),
             "train_tokens": curve[-1]["tokens"], "tokens_per_second": round(curve[-1]["tokens"] / seconds, 1),
             "eval_loss_initial": round(initial, 4), "eval_loss": round(final, 4),
             "eval_perplexity": round(math.exp(min(final, 50)), 3), "seconds": round(seconds, 2), "device": device,
             **corpus_coverage(curve[-1]["tokens"], train_blocks.size, len(stream))}
    run.commit("model", stats, expected_shards=1)
    log.info("pretrain: %d params, eval loss %.3f -> %.3f in %.0fs", stats["parameters"], initial, final, seconds)


STAGE = Stage("pretrain", PretrainConfig, {"model": "model"}, run_pretrain, needs=pretrain_needs,
              external=user_model, description="the bootstrap tiny Llama, or the user's model by path")
