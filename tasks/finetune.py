"""Stage `finetune`: train the base causal LM on selected subsets, with Mini-Sequence Transformer memory savings.

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

import json
import tempfile
import time

import numpy as np
import pyarrow as pa
from tracecore.configs.schema import ConfigError, FinetuneConfig
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.instructions import collate, encode, load_pool, pool_inputs, pool_needs
from tracecore.tasks.models import (
    buildable,
    device_and_dtype,
    lora_kwargs,
    model_dir,
    resolve_lora_targets,
    user_model_config,
)
from tracecore.tasks.plots import figure_png, integer_ticks, subplots
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, get_logger, map_shards, set_torch_threads
from tracecore.tasks.runtime.stage import Planned, Stage, StageRun, plan_artifact

SUMMARY_COLUMNS = ["variant", "subset", "seed", "records", "steps", "train_loss", "eval_loss_base", "eval_loss",
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


# ---- model ---------------------------------------------------------------------------------------
def load_model(folder: str, cfg: FinetuneConfig, device: str, dtype, config=None):
    """Tokenizer + causal LM (LoRA-wrapped if configured, MsT-wrapped if configured), seeded init."""
    import torch
    from tracecore.kernels.mini_sequence import apply_mini_sequence
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with MODEL_LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        extra = {"config": config} if config is not None else {}
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     dtype=dtype, **extra)
    torch.manual_seed(cfg.seed)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, bias="none",
                                                 lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                                                 **lora_kwargs(model, cfg.target_modules, "finetune.target_modules")))
    if cfg.mini_sequence:
        apply_mini_sequence(model, cfg.lm_chunks, cfg.mlp_chunks)
        if not model.mini_sequence["mlp_layers"]:
            get_logger().info("finetune: Mini-Sequence chunks the LM head only: model type %r has no MLP entry in "
                              "kernels/families.py", model.config.model_type)
    return tok, model.to(device)


def save_model(model, tok, folder: str) -> None:
    """A plain HF folder (safetensors): LoRA is merged, so every consumer loads it the same way."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


# ---- training ----------------------------------------------------------------------------------
def step_batches(n: int, cfg: FinetuneConfig, seed: int) -> list[list[list[int]]]:
    """Per optimizer step, its micro-batches of record indices; epoch e uses permutation(seed, e)."""
    per_step = cfg.batch_size * cfg.grad_accum
    steps = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
        for start in range(0, n, per_step):
            chunk = order[start:start + per_step]
            steps.append([chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)])
    return steps[: cfg.max_steps] if cfg.max_steps else steps


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-wide on CPU


def response_loss(model, data: list, pad_id: int, batch_size: int, device: str) -> float:
    """Token-weighted mean loss on response tokens (held-out quality of an instruction model)."""
    import torch

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            ids, labels, mask = (t.to(device) for t in collate(data[i:i + batch_size], pad_id))
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            tokens += n
    model.train()
    return total / max(tokens, 1)


def train(model, data: list, pad_id: int, cfg: FinetuneConfig, seed: int, device: str, resume, log) -> list[dict]:
    """The optimizer loop; `resume` loads/saves checkpoints (see `Resume`). Returns the loss curve."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    plan = step_batches(len(data), cfg, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * len(plan)), len(plan))
    start_step, curve = resume.load(model, opt, sched)
    if start_step == 0:  # a resumed run restores the saved RNG state instead
        torch.manual_seed(seed * 7919)
    begin, tokens = time.perf_counter(), 0
    model.train()
    for step in range(start_step, len(plan)):
        batches = [collate([data[i] for i in micro], pad_id) for micro in plan[step]]
        step_tokens = sum(int((b[1][:, 1:] != -100).sum()) for b in batches)
        loss_sum = 0.0
        for ids, labels, mask in batches:
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            (loss * n / max(step_tokens, 1)).backward()
            loss_sum += float(loss) * n
            tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - begin
        curve.append({"step": step + 1, "loss": loss_sum / max(step_tokens, 1), "lr": sched.get_last_lr()[0],
                      "tokens_per_second": tokens / max(seconds, 1e-9), "peak_memory_mb": peak_memory_mb(device)})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(plan):
            resume.save(step + 1, model, opt, sched, curve)
        if (step + 1) % cfg.log_every == 0 or step + 1 == len(plan):
            log.info("finetune step %d/%d loss %.3f %.0f tok/s peak %.0f MB", step + 1, len(plan),
                     curve[-1]["loss"], curve[-1]["tokens_per_second"], curve[-1]["peak_memory_mb"])
    return curve


class Resume:
    """Resumable training state under the artifact's `_files/resume/` (safetensors + JSON, no pickle)."""

    def __init__(self, store: ArtifactStore, ref: str):
        self.store, self.ref, self.started_at = store, ref, 0

    def save(self, step: int, model, opt, sched, curve: list[dict]) -> None:
        import torch

        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        state = opt.state_dict()
        tensors = {f"opt.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
        self.store.write_tensors(self.ref, "resume/weights.safetensors", weights)
        self.store.write_tensors(self.ref, "resume/optimizer.safetensors",
                                 {**tensors, "rng": torch.get_rng_state()})
        meta = {"step": step, "groups": state["param_groups"], "sched": sched.state_dict(), "curve": curve}
        self.store.write_file(self.ref, "resume/state.json", json.dumps(meta).encode())  # written last

    def load(self, model, opt, sched) -> tuple[int, list[dict]]:
        import torch

        try:
            meta = json.loads(self.store.read_file(self.ref, "resume/state.json"))
        except FileNotFoundError:
            return 0, []
        weights = self.store.read_tensors(self.ref, "resume/weights.safetensors")
        tensors = self.store.read_tensors(self.ref, "resume/optimizer.safetensors")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(weights[n])
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": meta["groups"]})
        sched.load_state_dict(meta["sched"])
        torch.set_rng_state(tensors["rng"])
        self.started_at = meta["step"]
        get_logger().info("finetune: resuming %s from step %d", self.ref, meta["step"])
        return meta["step"], meta["curve"]

    def clear(self) -> None:
        path = f"{self.store.files_dir(self.ref)}/resume"
        if self.store.fs.exists(path):
            self.store.fs.rm(path, recursive=True)


# ---- one variant (a Dask task) ------------------------------------------------------------------------
def subset_records(store: ArtifactStore, pool: list[dict], subset_ref: str | None, seed: int = 0) -> list[dict]:
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
        stats = {"variant": item["variant"], "subset": item["subset"], "seed": item["seed"], "records": len(data),
                 "steps": len(curve), "train_loss": curve[-1]["loss"], "eval_loss_base": base_loss,
                 "eval_loss": final, "tokens_per_second": curve[-1]["tokens_per_second"],
                 "peak_memory_mb": curve[-1]["peak_memory_mb"], "seconds": time.perf_counter() - start,
                 "resumed_from_step": resume.started_at, "device": device}
        store.commit(ref, {**item["lineage"], **stats}, expected_shards=1)
        log.info("finetune %s: held-out loss %.3f -> %.3f", item["variant"], base_loss, final)
    row = {k: store.manifest(ref).get(k) for k in SUMMARY_COLUMNS} | {"model_ref": ref}
    return store.write_shard(summary_ref, shard, pa.Table.from_pylist([row]), records=1)


# ---- ChatQA 2 context extension ------------------------------------------------------------------------
def packed_long_blocks(store: ArtifactStore, tokens_ref: str, separator: list[int], seq_len: int) -> np.ndarray:
    """Corpus documents joined with the separator tokens, cut into `seq_len` blocks."""
    from tracecore.tasks.lm_training import token_stream

    stream = token_stream(store, tokens_ref, separator)
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"finetune.long_context: corpus has {len(stream)} tokens, less than seq_len={seq_len}")
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

    store, cfg, model_ref, tokens_ref, ref = run.store, run.cfg, run.inputs["model"], run.inputs["tokens"], run.ref("long_model")
    lc, (device, dtype) = cfg.long_context, device_and_dtype(cfg.device)
    with model_dir(store, model_ref) as folder:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        set_rope_theta(config, lc.rope_theta, lc.seq_len)
        tok, model = load_model(folder, cfg.model_copy(update={"lora": False}), device, dtype, config=config)
    blocks = packed_long_blocks(store, tokens_ref, tok(lc.separator, add_special_tokens=False)["input_ids"], lc.seq_len)
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
    run.commit("long_model", {"rope_theta": lc.rope_theta, "seq_len": lc.seq_len, "final_loss": curve[-1]["loss"],
                              "seconds": curve[-1]["seconds"]}, expected_shards=1)
    log.info("finetune: context extended to %d tokens (rope_theta %.3g), loss %.3f", lc.seq_len, lc.rope_theta,
             curve[-1]["loss"])


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
    report = map_shards("finetune", store, summary, train_variant, items, run.cluster, cfg=cfg)
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
