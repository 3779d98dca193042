"""Stage `pretrain`: the bootstrap model, a tiny Llama-architecture causal LM trained on the token shards.

Later stages load any HF causal LM by local path; this stage either trains the tiny model
(embedded default) or registers the user's model folder (`pretrain.model_path`) without copying it.
The result is a Hugging Face folder (config, safetensors weights, tokenizer) plus a loss-curve shard.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.lm_training import (
    ModelShape,
    TrainSchedule,
    build_model,
    corpus_coverage,
    eval_loss,
    split_blocks,
    token_stream,
    train,
)
from tracecore.tasks.models import resolve_device, user_model_config
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, set_torch_threads
from tracecore.tasks.runtime.stage import Stage, StageRun


class PretrainConfig(TrainSchedule, ModelShape):
    """The bootstrap Llama-architecture model, or a user's model by path."""

    model_path: str | None = Field(None, description=(
        "local HF causal-LM folder, a .gguf file, or a packaged model (smollm2-135m-instruct); None = "
        "pretrain a tiny Llama"))
    eval_fraction: float = Field(0.02, gt=0, lt=0.5)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")


class ModelPathError(ValueError):
    pass


def pretrain_needs(pipeline_cfg) -> dict[str, str]:
    """A user's model reads no token shards; the bootstrap model trains on them."""
    tokens = {} if pipeline_cfg.pretrain.model_path else {"tokens": "tokenize.tokens"}
    return {**tokens, "tokenizer": "tokenize.tokenizer"}


def user_model(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """A user's model (folder, GGUF file or packaged model) is an input: checked to be a causal LM
    transformers
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
    """A local Hugging Face folder with safetensors weights, checked when the run is planned (before any
    work)."""
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelPathError(f"pretrain.model_path: {path!r} is not a Hugging Face model folder "
                             "(config.json missing)")
    if not list(folder.glob("*.safetensors")):
        raise ModelPathError(f"pretrain.model_path: {path!r} has no *.safetensors weights "
                             "(pickled .bin weights are refused)")
    return folder.resolve()


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
    set_torch_threads(cfg.threads)
    device = resolve_device(cfg.device)
    with store.local_dir(run.inputs["tokenizer"]) as tok_dir:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True, trust_remote_code=False)
    stream = token_stream(store, run.inputs["tokens"], [tokenizer.eos_token_id])
    train_blocks, eval_blocks = split_blocks(stream, cfg.seq_len, cfg.eval_fraction)
    # construction too: another thread's from_pretrained patches module init process-wide
    with MODEL_LOAD_LOCK:
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
    store.write_file(run.ref("model"), "plots/loss.png", loss_curve_png(curve, run.ref("model")))
    seconds = curve[-1]["seconds"]
    stats = {"parameters": sum(p.numel() for p in model.parameters()), "steps": len(curve),
             "train_tokens": curve[-1]["tokens"],
             "tokens_per_second": round(curve[-1]["tokens"] / seconds, 1),
             "eval_loss_initial": round(initial, 4), "eval_loss": round(final, 4),
             "eval_perplexity": round(math.exp(min(final, 50)), 3), "seconds": round(seconds, 2),
             "device": device,
             **corpus_coverage(curve[-1]["tokens"], train_blocks.size, len(stream)),
             "plots": ["plots/loss.png"]}
    run.commit("model", stats, expected_shards=1)
    log.info("pretrain: %d params, eval loss %.3f -> %.3f in %.0fs", stats["parameters"], initial, final,
             seconds)


def loss_curve_png(curve: list[dict], model_ref: str) -> bytes:
    """The training loss over tokens, drawn when the model is trained (the report only copies the file)."""
    from tracecore.tasks.plots import figure_png, subplots

    fig, ax = subplots(figsize=(6, 3.5))
    ax.plot([c["tokens"] for c in curve], [c["loss"] for c in curve], lw=1)
    ax.set(xlabel="training tokens", ylabel="loss", title=f"pretrain loss ({model_ref})")
    return figure_png(fig)


STAGE = Stage("pretrain", PretrainConfig, {"model": "model"}, run_pretrain, needs=pretrain_needs,
              external=user_model, description="the bootstrap tiny Llama, or the user's model by path")
