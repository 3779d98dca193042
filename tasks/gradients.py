"""Stage `gradients`: LoRA warm-up and per-sample Adam-aware gradient features (TAGCOS, arXiv 2407.15235;
LESS).

1. Warm-up: LoRA (peft) on a seeded random `warmup_fraction` of the instruction pool, loss on response
   tokens only; adapter + AdamW state (exp_avg, exp_avg_sq, in parameter order) saved as safetensors at
   each `checkpoint_steps` step, with the learning rate that step trained with. The checkpoints sit inside
   the linear warm-up (rising lr, the last weighs most), as in TAGCOS's steps 10/20/30.
2. Features, per pool shard on Dask and per checkpoint: the gradient g of the sample's mean response-token
   loss w.r.t. the LoRA parameters, turned into the Adam direction m'/(sqrt(v') + eps) with
   m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2 (b1 0.9, b2 0.999, eps 1e-8, no bias correction, as the
   official code; eps outside the sqrt as in the paper, the code has it inside), projected by a seeded
   Rademacher matrix, L2-normalized, then averaged over checkpoints
   with the learning-rate weights (normalized to sum 1).

Per-sample gradients are exact and batched without a batch-size-1 loop (`kernels/per_sample.py`): a LoRA
factor is a bias-free Linear, so its per-sample gradient is sum_t grad_out[b, t] (x) input[b, t] (the Opacus
identity); hooks capture both in one backward pass of the summed per-sample losses. The projection matrix is
generated block by block from (seed, block) so memory stays bounded and results do not depend on sharding.
Deviation: the official projector is TRAK's; ours is a plain Rademacher/sqrt(k) projection with the same
distribution, not bit-identical to TRAK.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator
from tracecore.configs.base import Strict
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.instructions import collate, encode, load_pool, pool_inputs, pool_needs
from tracecore.tasks.models import check_user_lora_targets, lora_kwargs, model_dir, resolve_device
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, log_dropped, set_torch_threads
from tracecore.tasks.runtime.stage import Stage, StageRun


class GradientsConfig(Strict):
    """TAGCOS/LESS gradient features. Official values in comments; the tiny profile scales them down."""

    pool_path: str | None = Field(None, description="Alpaca-style JSONL; None = sample world instructions")
    warmup_fraction: float = Field(0.05, gt=0, le=1)
    checkpoint_steps: list[int] = Field(default_factory=lambda: [10, 20, 30], min_length=1)
    lr: float = Field(2e-5, gt=0, lt=1, description="peak lr of the planned linear warm-up schedule")
    lr_warmup_steps: int | None = Field(None, ge=1, description="linear warm-up length; None = 2 x the last "
                                        "checkpoint step, so checkpoints train at rising lrs (TAGCOS "
                                        "10/20/30)")
    planned_epochs: int = Field(4, ge=1, description="planned schedule length in epochs over the warm-up "
                                "subset (LESS: 4); decay starts after the warm-up")
    batch_size: int = Field(8, ge=1, description="warm-up batch (official 1 x 32 accumulation x GPUs)")
    lora_r: int = Field(128, ge=1)
    lora_alpha: int = Field(512, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = Field(None,
                                             description="LoRA targets; None = the architecture's attention "
                                             "projections (kernels/families.py: q/k/v/o_proj, GPT-NeoX "
                                             "query_key_value + attention.dense, GPT-2 c_attn + attn.c_proj)")
    max_seq_len: int = Field(512, ge=8)
    proj_dim: int = Field(8192, ge=8, le=65_536)
    proj_seed: int = 0
    feature_batch_size: int = Field(16, ge=1)
    shards: int = Field(4, ge=1, le=100_000)
    threads: int = Field(1, ge=0, description="torch threads per Dask worker; 0 = default")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    seed: int = 0

    @model_validator(mode="after")
    def _sorted_steps(self) -> GradientsConfig:
        if sorted(set(self.checkpoint_steps)) != self.checkpoint_steps or self.checkpoint_steps[0] < 1:
            raise ValueError("checkpoint_steps must be increasing positive integers")
        return self


BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


# ---- model, LoRA, warm-up -----------------------------------------------------------------------
def lora_model(model_dir: str, cfg: GradientsConfig):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with MODEL_LOAD_LOCK:
        torch.manual_seed(cfg.seed)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            bias="none",
                            task_type="CAUSAL_LM",
                            **lora_kwargs(base, cfg.target_modules, "gradients.target_modules"))
        return tok, get_peft_model(base, config)


def lora_params(model) -> list[tuple[str, object]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def warmup_lr(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """The lr optimizer step `step` (1-based) trains with: linear warm-up to `peak` over `warmup_steps`, then
    linear decay to 0 at `total_steps` (LESS's linear schedule). Step 1 already trains at peak /
    warmup_steps."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def planned_schedule(cfg: GradientsConfig, n_records: int) -> tuple[int, int]:
    """(warm-up steps, total steps) of the planned warm-up training, of which only the first
    max(checkpoint_steps) run. TAGCOS stops at step 30 inside the warm-up (its checkpoints 10/20/30 carry
    rising lrs, the last at half the peak), so the default warm-up is twice the last checkpoint step;
    the total is LESS's 4 epochs over the warm-up subset."""
    warm = cfg.lr_warmup_steps or 2 * max(cfg.checkpoint_steps)
    total = max(warm, cfg.planned_epochs * -(-n_records // cfg.batch_size))
    return warm, total


def warmup(model, tok, records: list[dict], cfg: GradientsConfig, log) -> list[dict]:
    """LoRA warm-up; returns one checkpoint dict (step, lr, adapter, exp_avg, exp_avg_sq) per checkpoint step,
    where lr is the rate that checkpoint's own step trained with."""
    import torch
    from tracecore.kernels.per_sample import per_sample_loss

    params = [p for _, p in lora_params(model)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps, (warm, total) = max(cfg.checkpoint_steps), planned_schedule(cfg, len(records))
    rng = random.Random(cfg.seed)
    data = [encode(tok, r, cfg.max_seq_len) for r in records]
    checkpoints, model = [], model.train()
    device = next(model.parameters()).device
    for step in range(1, steps + 1):
        lr = warmup_lr(step, cfg.lr, warm, total)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [t.to(device) for t in
                 collate([data[rng.randrange(len(data))] for _ in range(cfg.batch_size)], tok.pad_token_id)]
        loss = per_sample_loss(model, *batch).mean()
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        if step in cfg.checkpoint_steps:
            state = [opt.state[p] for p in params]
            checkpoints.append({"step": step, "lr": lr, "loss": float(loss),
                                "adapter": [p.detach().cpu().clone() for p in params],
                                "exp_avg": [s["exp_avg"].cpu().clone() for s in state],
                                "exp_avg_sq": [s["exp_avg_sq"].cpu().clone() for s in state]})
            log.info("gradients warm-up step %d/%d loss %.3f lr %.2e (warm-up %d of %d planned steps)",
                     step, steps, float(loss), lr, warm, total)
    return checkpoints


def save_checkpoints(store: ArtifactStore, ref: str, names: list[str], checkpoints: list[dict]) -> None:
    for c in checkpoints:
        for kind in ("adapter", "exp_avg", "exp_avg_sq"):
            store.write_tensors(ref, f"ckpt-{c['step']}/{kind}.safetensors", dict(zip(names, c[kind])))
    store.write_shard(ref, 0,
                      pa.Table.from_pylist([{k: c[k] for k in ("step", "lr", "loss")} for c in checkpoints]))


def adam_direction(g, exp_avg, exp_avg_sq):
    """LESS's Adam direction m' / (sqrt(v') + eps) as the paper writes it (the official code puts eps inside
    the sqrt; the two differ only where v' is tiny against eps)."""
    m = BETA1 * exp_avg + (1 - BETA1) * g
    v = BETA2 * exp_avg_sq + (1 - BETA2) * g * g
    return m / (v.sqrt() + EPS)


class Projector:
    """x @ R with R[i, j] = +-1/sqrt(dim), each row block generated from (seed, block index) on the CPU, so
    the same matrix comes out on any device. Blocks are kept once generated while R fits `cache_bytes`
    (a small model's LoRA width x dim); past that they are regenerated per call, as a 7B model's would be.
    Regenerating per batch was ~45 s of the tiny default's gradient stage (0.18 s per 32-record batch)."""

    def __init__(self, dim: int, seed: int, block: int = 4096, cache_bytes: int = 512 << 20):
        self.dim, self.seed, self.block, self.cache_bytes = dim, seed, block, cache_bytes
        self.blocks: dict[tuple[int, str], object] = {}

    def _signs(self, start: int, rows: int, device):
        import torch

        key = (start, str(device))
        if key in self.blocks:
            return self.blocks[key]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start // self.block)
        signs = (torch.randint(0, 2, (rows, self.dim), generator=gen).float() * 2 - 1).to(device)
        if (len(self.blocks) + 1) * self.block * self.dim * 4 <= self.cache_bytes:
            self.blocks[key] = signs
        return signs

    def __call__(self, x):
        import torch

        out = torch.zeros(x.shape[0], self.dim, device=x.device)
        for start in range(0, x.shape[1], self.block):
            out += x[:, start:start + self.block] @ self._signs(start, min(self.block, x.shape[1] - start),
                                                                x.device)
        return out / self.dim ** 0.5


def project(x, dim: int, seed: int, block: int = 4096):
    """One-off projection (see `Projector`)."""
    return Projector(dim, seed, block, cache_bytes=0)(x)


def checkpoint_weights(lrs: list[float]) -> np.ndarray:
    """TAGCOS's mean over checkpoints: each weighted by the lr it trained with, normalized to sum 1."""
    lrs = np.asarray(lrs, dtype=np.float64)
    return lrs / lrs.sum()


def load_checkpoint(store: ArtifactStore, warmup_ref: str, step: int, names: list[str]) -> dict:
    return {kind: store.read_tensors(warmup_ref, f"ckpt-{step}/{kind}.safetensors")
            for kind in ("adapter", "exp_avg", "exp_avg_sq")}


def shard_features(store_uri: str, ref: str, shard: int, item: tuple, cfg: GradientsConfig) -> dict:
    """Features of one pool shard: per checkpoint Adam direction -> projection -> L2 norm; then the
    learning-rate-weighted mean over checkpoints. Written as fp16 fixed-size lists."""
    import torch
    from tracecore.kernels.per_sample import batched_grads
    set_torch_threads(cfg.threads)
    store = ArtifactStore(store_uri)
    model_ref, warmup_ref, records = item
    with model_dir(store, model_ref) as folder:
        tok, model = lora_model(folder, cfg)
    device = resolve_device(cfg.device)
    model = model.to(device).eval()  # dropout off: a feature must not depend on a random mask
    names = [n for n, _ in lora_params(model)]
    ckpts = store.read_table(warmup_ref).to_pylist()
    weights = checkpoint_weights([c["lr"] for c in ckpts])
    data = [encode(tok, r, cfg.max_seq_len) for r in records]
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))  # similar lengths: little padding
    data, restore = [data[i] for i in order], np.argsort(order)
    per_ckpt, projector = [], Projector(cfg.proj_dim, cfg.proj_seed)
    for c in ckpts:
        state = load_checkpoint(store, warmup_ref, c["step"], names)
        with torch.no_grad():
            for n, p in lora_params(model):
                p.copy_(state["adapter"][n].to(device))
        m = torch.cat([state["exp_avg"][n].flatten() for n in names]).to(device)
        v = torch.cat([state["exp_avg_sq"][n].flatten() for n in names]).to(device)
        rows = []
        for i in range(0, len(data), cfg.feature_batch_size):
            batch = [t.to(device) for t in collate(data[i:i + cfg.feature_batch_size], tok.pad_token_id)]
            g = batched_grads(model, batch)
            rows.append(projector(adam_direction(g, m, v)).cpu())
        feats = torch.cat(rows)[torch.as_tensor(restore)]
        per_ckpt.append(torch.nn.functional.normalize(feats, dim=1))
    mean = sum(w * f for w, f in zip(weights, per_ckpt))
    columns = {"record_id": [r["id"] for r in records], "feature": _fsl(mean)}
    columns |= {f"ckpt_{c['step']}": _fsl(f) for c, f in zip(ckpts, per_ckpt)}
    return store.write_shard(ref, shard, pa.table(columns), records=len(records))


def _fsl(t) -> pa.FixedSizeListArray:
    values = pa.array(t.numpy().astype(np.float16).ravel(), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, t.shape[1])


def run_gradients(run: StageRun) -> None:
    store, cfg, model_ref, pool_path = run.store, run.cfg, run.inputs["model"], run.args["pool_path"]
    records, rejects = load_pool(pool_path)
    if not records:
        raise ValueError(f"gradients: no usable records in {pool_path} ({len(rejects)} rejected)")
    pool = {"pool": pool_path, "pool_records": len(records), "pool_rejects": rejects[:100]}
    if rejects:
        log_dropped("gradients", "pool rows", len(records) + len(rejects),
                    {f"rejected (first: line {rejects[0]['line']}: {rejects[0]['reason']})": len(rejects)},
                    "the warmup manifest lists up to 100")
    if not store.is_committed(run.ref("warmup")):
        with model_dir(store, model_ref) as folder:
            tok, model = lora_model(folder, cfg)
        model = model.to(resolve_device(cfg.device))
        subset = random.Random(cfg.seed).sample(records, max(1, int(cfg.warmup_fraction * len(records))))
        checkpoints = warmup(model, tok, subset, cfg, run.log)
        save_checkpoints(store, run.ref("warmup"), [n for n, _ in lora_params(model)], checkpoints)
        run.commit("warmup", {**pool, "warmup_records": len(subset)}, expected_shards=1)
    shards = [records[i::cfg.shards] for i in range(cfg.shards)]
    report = run.map("features", shard_features, [(model_ref, run.ref("warmup"), s) for s in shards], cfg=cfg)
    run.commit("features", {**pool, "seconds": report.seconds, "skipped_shards": report.skipped,
                            "records_per_second": round(report.sum_computed("records") / report.seconds, 2)
                            if report.computed else None, "proj_dim": cfg.proj_dim},
                            expected_shards=cfg.shards)
    run.log.info("gradients: %d features of dim %d in %d shards (%d skipped)", len(records), cfg.proj_dim,
                 cfg.shards, report.skipped)


def gradients_inputs(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """The pool; a user's model is checked against the LoRA targets first (before any work)."""
    check_user_lora_targets(pipeline_cfg, pipeline_cfg.gradients.target_modules, "gradients.target_modules")
    return pool_inputs(pipeline_cfg, upstream, store)


STAGE = Stage("gradients", GradientsConfig, {"features": "features", "warmup": "warmup"}, run_gradients,
              needs=lambda c: {"model": "pretrain.model", **pool_needs(c)}, external=gradients_inputs,
              description="LoRA warm-up + per-sample Adam-aware gradient features (TAGCOS/LESS)")
