"""Stage `finetune`: train the base causal LM on selected subsets, with Mini-Sequence Transformer memory
savings.

One variant per (subset, seed): `tagcos`, `random`, `cluster_random` (the select stage's coresets) or
`full` (the whole pool). Each variant is one Dask task and one content-addressed model artifact, so a
new seed or subset trains only what is new. Records use the gradients stage's instruction template with
the loss on response tokens; AdamW, linear warm-up then cosine decay, gradient accumulation (the loss is
a token mean over the whole accumulated batch); full fine-tuning or LoRA (merged before saving); bf16
on CUDA, fp32 on CPU. Every `checkpoint_every` steps the trainable weights, optimizer, scheduler and RNG
state go to the artifact's `resume/` as safetensors + JSON, so a killed run restarts from there; the
data order is a pure function of (seed, epoch), which makes the resumed run follow the same path.

Optional ChatQA 2 context extension (arXiv 2407.14482) runs once before the variants: RoPE base raised,
training continued on corpus documents packed into long sequences with a separator string.
"""

from __future__ import annotations

import tempfile
import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.configs.schema import ConfigError
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.finetune_training import Resume, load_model, response_loss, save_model, train
from tracecore.tasks.instructions import encode, load_pool, pool_inputs, pool_needs
from tracecore.tasks.models import (
    buildable,
    device_and_dtype,
    model_dir,
    resolve_lora_targets,
    user_model_config,
)
from tracecore.tasks.plots import figure_png, integer_ticks, subplots
from tracecore.tasks.runtime.common import get_logger, set_torch_threads
from tracecore.tasks.runtime.stage import Planned, Stage, StageRun, plan_artifact


class LongContextConfig(Strict):
    """ChatQA 2-style context extension before fine-tuning: raise the RoPE base, continue training on
    corpus documents packed into long sequences with a separator string between documents."""

    enabled: bool = False
    rope_theta: float = Field(1.5e8, gt=0, description="ChatQA 2: 500k -> 150M for 8K -> 128K")
    seq_len: int = Field(1024, ge=16, le=1_048_576)
    steps: int = Field(50, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(3e-5, gt=0, lt=1, description="ChatQA 2: 3e-5")
    separator: str = Field("<s>", min_length=1, description="between packed documents (not the EOS token)")


class FinetuneConfig(Strict):
    """Fine-tune the base model on selected subsets (TAGCOS, baselines, full pool), several seeds each."""

    subsets: list[Literal["tagcos", "random", "cluster_random", "full"]] = Field(
        default_factory=lambda: ["tagcos", "random", "cluster_random", "full"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    full_seeds: int | None = Field(None, ge=1, description=(
        "the `full` pool reference trains on only the first N seeds (it is a reference, not part of the "
        "paired TAGCOS - random verdict, and on CPU its run is the longest); None = every seed"))
    eval_path: str | None = Field(None, description="held-out Alpaca-style JSONL; None = sample eval split")
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps per variant")
    lr: float = Field(2e-5, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(8, ge=1, description="micro-batch")
    grad_accum: int = Field(4, ge=1)
    max_seq_len: int = Field(512, ge=8)
    lora: bool = Field(False, description="LoRA via peft (merged before saving) instead of full fine-tuning")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None,
                                             description="LoRA targets; None = the architecture's attention "
                                             "projections (kernels/families.py: q/k/v/o_proj, GPT-NeoX "
                                             "query_key_value + attention.dense, GPT-2 c_attn + attn.c_proj)")
    mini_sequence: bool = Field(True, description="MsT chunked LM head + MLP with activation recomputation")
    lm_chunks: int | None = Field(None, ge=1, description="None = ceil(vocab / hidden)")
    mlp_chunks: int | None = Field(None, ge=1, description="None = ceil(intermediate / hidden)")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    log_every: int = Field(10, ge=1,
                           description="optimizer steps between Prefect log lines (the curve keeps all)")
    long_context: LongContextConfig = Field(default_factory=LongContextConfig)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    threads: int = Field(1, ge=0, description="torch threads per Dask worker; 0 = default")
    seed: int = 0


SUMMARY_COLUMNS = ["variant", "subset", "seed", "records", "steps", "train_loss", "eval_loss_base",
                   "eval_loss",
                   "tokens_per_second", "peak_memory_mb", "seconds", "resumed_from_step", "device"]


def variants(cfg: FinetuneConfig) -> list[tuple[str, int]]:
    """(subset, seed) pairs to train; the `full` reference only on the first `full_seeds` seeds."""
    return [(subset, seed) for subset in cfg.subsets
            for seed in (cfg.seeds[: cfg.full_seeds] if subset == "full" and cfg.full_seeds else cfg.seeds)]


def training_hash(cfg: FinetuneConfig) -> str:
    """Config hash of one variant: everything but the subset/seed lists, so adding a seed or a subset
    re-uses every variant already trained."""
    return cfg.model_copy(update={"subsets": ["full"], "seeds": [0], "full_seeds": None}).fingerprint()


def finetune_needs(pipeline_cfg) -> dict[str, str]:
    """The base model, the three coresets, the instruction pool and held-out split (user files or the sample
    world), and the token shards only for the optional context extension."""
    cfg, needs = pipeline_cfg.finetune, {"model": "pretrain.model", "tagcos": "select.coreset",
                                         "random": "select.random", "cluster_random": "select.cluster_random"}
    if cfg.long_context.enabled:
        needs["tokens"] = "tokenize.tokens"
    if not cfg.eval_path:
        needs["sample"] = "sample.sample"
    return needs | pool_needs(pipeline_cfg)


def check_user_model(pipeline_cfg) -> None:
    """A user's model, checked when the run is planned: LoRA targets exist, Mini-Sequence applies."""
    from tracecore.kernels.families import meta_model, mini_sequence_obstacle

    cfg, config = pipeline_cfg.finetune, user_model_config(pipeline_cfg)
    if config is None:
        return
    if cfg.lora:
        resolve_lora_targets(config, cfg.target_modules, "finetune.target_modules")
    obstacle = mini_sequence_obstacle(config, buildable(config, meta_model).get_output_embeddings())
    if cfg.mini_sequence and obstacle:
        raise ConfigError(f"finetune.mini_sequence: model type {config.model_type!r}: {obstacle}; "
                          "set finetune.mini_sequence: false")


def finetune_inputs(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """The pool (as for gradients) and the held-out split: a user file by identity, or the sample's split."""
    from tracecore.storage.fs import input_fingerprint, list_input_files

    check_user_model(pipeline_cfg)
    inputs, args = pool_inputs(pipeline_cfg, upstream, store)
    eval_path = pipeline_cfg.finetune.eval_path
    if eval_path:
        inputs["eval_split"] = input_fingerprint(list_input_files([eval_path], "finetune.eval_path"))
    else:
        eval_path = f"{store.files_path(upstream['sample'])}/instructions/eval.jsonl"
    return inputs, {**args, "eval_path": eval_path}


def variant_models(cfg: FinetuneConfig, inputs: dict[str, str], code: str) -> dict[str, Planned]:
    """One model artifact per (subset, seed), keyed by what that variant trains on (not by the subset or
    seed lists), so adding a seed or a subset reuses every variant already trained."""
    out, base = {}, inputs["model"]
    if cfg.long_context.enabled:
        out["long_model"] = plan_artifact("finetune", "model_long", cfg.long_context.fingerprint(),
                                          {"model": base, "tokens": inputs["tokens"]}, code)
        base = out["long_model"].ref
    pool = inputs.get("pool") or inputs["sample"]
    held_out = inputs.get("eval_split") or inputs["sample"]
    for subset, seed in variants(cfg):
        data = inputs[subset] if subset != "full" else pool
        out[f"model_{subset}_s{seed}"] = plan_artifact(
            "finetune", "finetuned", training_hash(cfg),
            {"model": base, "data": data, "seed": str(seed), "eval_split": held_out}, code)
    return out


# ---- one variant (a Dask task) ------------------------------------------------------------------------
def subset_records(store: ArtifactStore, pool: list[dict], subset_ref: str | None,
                   seed: int = 0) -> list[dict]:
    """The pool records of a subset; a baseline with several random draws gives seed s draw s mod draws."""
    if subset_ref is None:
        return pool
    table = store.read_table(subset_ref)
    if "draw" in table.column_names:
        draws = table.column("draw").to_pylist()
        table = table.filter(pa.array([d == seed % (max(draws) + 1) for d in draws]))
    wanted = set(table.column("record_id").to_pylist())
    chosen = [r for r in pool if r["id"] in wanted]
    if len(chosen) != len(wanted):
        raise ValueError(f"finetune: {len(wanted) - len(chosen)} ids of {subset_ref} are not in the pool")
    return chosen


def train_variant(store_uri: str, summary_ref: str, shard: int, item: dict, cfg: FinetuneConfig) -> dict:

    set_torch_threads(cfg.threads)
    store, log, ref = ArtifactStore(store_uri), get_logger(), item["ref"]
    if not store.is_committed(ref):
        device, dtype = device_and_dtype(cfg.device)
        with model_dir(store, item["base"]) as folder:
            tok, model = load_model(folder, cfg, device, dtype)
        pool, _ = load_pool(item["pool_path"])
        records = subset_records(store, pool, item["subset_ref"], item["seed"])
        data = [encode(tok, r, cfg.max_seq_len) for r in records]
        held_out = [encode(tok, r, cfg.max_seq_len) for r in load_pool(item["eval_path"])[0]]
        base_loss = response_loss(model, held_out, tok.pad_token_id, cfg.batch_size, device)
        resume, start = Resume(store, ref), time.perf_counter()
        curve = train(model, data, tok.pad_token_id, cfg, item["seed"], device, resume, log)
        final = response_loss(model, held_out, tok.pad_token_id, cfg.batch_size, device)
        with tempfile.TemporaryDirectory(prefix="tracecore-ft-") as tmp:
            save_model(model, tok, tmp)
            resume.clear()
            store.put_dir(ref, tmp)
        store.write_shard(ref, 0, pa.Table.from_pylist(curve))
        stats = {"variant": item["variant"], "subset": item["subset"], "seed": item["seed"],
                 "records": len(data),
                 "steps": len(curve), "train_loss": curve[-1]["loss"], "eval_loss_base": base_loss,
                 "eval_loss": final, "tokens_per_second": curve[-1]["tokens_per_second"],
                 "peak_memory_mb": curve[-1]["peak_memory_mb"], "seconds": time.perf_counter() - start,
                 "resumed_from_step": resume.started_at, "device": device}
        store.commit(ref, {**item["lineage"], **stats}, expected_shards=1)
        log.info("finetune %s: held-out loss %.3f -> %.3f", item["variant"], base_loss, final)
    row = {k: store.manifest(ref).get(k) for k in SUMMARY_COLUMNS} | {"model_ref": ref}
    return store.write_shard(summary_ref, shard, pa.Table.from_pylist([row]), records=1)


# ---- ChatQA 2 context extension ------------------------------------------------------------------------
def packed_long_blocks(store: ArtifactStore, tokens_ref: str, separator: list[int],
                       seq_len: int) -> np.ndarray:
    """Corpus documents joined with the separator tokens, cut into `seq_len` blocks."""
    from tracecore.tasks.lm_training import token_stream

    stream = token_stream(store, tokens_ref, separator)
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"finetune.long_context: corpus has {len(stream)} tokens, less than "
                         f"seq_len={seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def set_rope_theta(config, theta: float, seq_len: int) -> None:
    """RoPE base and trained length; transformers 5 keeps the base in `rope_parameters`."""
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters["rope_theta"] = theta
    config.rope_theta = theta
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)


def extend_context(run: StageRun, log) -> None:
    import torch
    from transformers import AutoConfig

    store, cfg, ref = run.store, run.cfg, run.ref("long_model")
    model_ref, tokens_ref = run.inputs["model"], run.inputs["tokens"]
    lc, (device, dtype) = cfg.long_context, device_and_dtype(cfg.device)
    with model_dir(store, model_ref) as folder:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        set_rope_theta(config, lc.rope_theta, lc.seq_len)
        tok, model = load_model(folder, cfg.model_copy(update={"lora": False}), device, dtype, config=config)
    blocks = packed_long_blocks(store, tokens_ref, tok(lc.separator, add_special_tokens=False)["input_ids"],
                                lc.seq_len)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lc.lr)
    rng, curve, start = np.random.default_rng(cfg.seed), [], time.perf_counter()
    model.train()
    for step in range(lc.steps):
        x = torch.as_tensor(blocks[rng.integers(0, len(blocks), lc.batch_size)], device=device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": float(loss), "seconds": time.perf_counter() - start})
    with tempfile.TemporaryDirectory(prefix="tracecore-long-") as tmp:
        save_model(model, tok, tmp)
        store.put_dir(ref, tmp)
    store.write_shard(ref, 0, pa.Table.from_pylist(curve))
    run.commit("long_model",
               {"rope_theta": lc.rope_theta, "seq_len": lc.seq_len, "final_loss": curve[-1]["loss"],
                              "seconds": curve[-1]["seconds"]}, expected_shards=1)
    log.info("finetune: context extended to %d tokens (rope_theta %.3g), loss %.3f", lc.seq_len,
             lc.rope_theta, curve[-1]["loss"])


# ---- the stage -------------------------------------------------------------------------------------------
def loss_curves_png(store: ArtifactStore, rows: list[dict]) -> bytes:
    fig, ax = subplots(figsize=(6, 3.5))
    for row in rows:
        curve = store.read_table(row["model_ref"], columns=["step", "loss"]).to_pydict()
        ax.plot(curve["step"], curve["loss"], lw=1, label=row["variant"])
    ax.set(xlabel="optimizer step", ylabel="train loss (response tokens)", title="fine-tuning loss")
    integer_ticks(ax.xaxis)
    ax.legend(fontsize=7)
    return figure_png(fig)


def run_finetune(run: StageRun) -> None:
    store, cfg, log = run.store, run.cfg, run.log
    base = run.inputs["model"]
    if cfg.long_context.enabled:
        base = run.ref("long_model")
        if not store.is_committed(base):
            extend_context(run, log)
    items = [{"variant": f"{subset}_s{seed}", "subset": subset, "seed": seed, "base": base,
              "ref": run.ref(f"model_{subset}_s{seed}"), "lineage": run.lineage(f"model_{subset}_s{seed}"),
              "subset_ref": run.inputs.get(subset) if subset != "full" else None,
              "pool_path": run.args["pool_path"], "eval_path": run.args["eval_path"]}
             for subset, seed in variants(cfg)]
    summary = run.ref("finetune")
    report = run.map("finetune", train_variant, items, cfg=cfg)
    rows = [row for m in store.markers(summary) for row in store.read_shard(summary, m["shard"]).to_pylist()]
    store.write_file(summary, "plots/finetune_loss.png", loss_curves_png(store, rows))
    run.commit("finetune", {"seconds": report.seconds, "skipped_shards": report.skipped,
                            "plots": ["plots/finetune_loss.png"], "report_columns": SUMMARY_COLUMNS},
               expected_shards=len(items))
    for r in rows:
        log.info("finetune %s: %d records, held-out loss %.3f -> %.3f", r["variant"], r["records"],
                 r["eval_loss_base"], r["eval_loss"])


STAGE = Stage("finetune", FinetuneConfig, {"finetune": "finetune"}, run_finetune, needs=finetune_needs,
              external=finetune_inputs, subartifacts=variant_models,
              description="fine-tune the base model on each subset and seed (Mini-Sequence Transformer)")
