"""How the finetune stage trains one variant: the model (full or LoRA, Mini-Sequence on), the data order (a
pure function of seed and epoch), the loop with resumable checkpoints, the response-only loss. A library
module of `finetune` (fingerprinted with it), apart so the stage module reads top to bottom.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.instructions import collate
from tracecore.tasks.models import (
    lora_kwargs,
)
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, get_logger

if TYPE_CHECKING:  # the type only: the stage's config is not code this library runs
    from tracecore.tasks.finetune import FinetuneConfig


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
                                                 **lora_kwargs(model, cfg.target_modules,
                                                               "finetune.target_modules")))
    if cfg.mini_sequence:
        apply_mini_sequence(model, cfg.lm_chunks, cfg.mlp_chunks)
        if not model.mini_sequence["mlp_layers"]:
            get_logger().info("finetune: Mini-Sequence chunks the LM head only: model type %r has no MLP "
                              "entry in kernels/families.py", model.config.model_type)
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


def train(model, data: list, pad_id: int, cfg: FinetuneConfig, seed: int, device: str, resume,
          log) -> list[dict]:
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
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         labels=labels.to(device)).loss
            (loss * n / max(step_tokens, 1)).backward()
            loss_sum += float(loss) * n
            tokens += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - begin
        curve.append({"step": step + 1, "loss": loss_sum / max(step_tokens, 1), "lr": sched.get_last_lr()[0],
                      "tokens_per_second": tokens / max(seconds, 1e-9),
                      "peak_memory_mb": peak_memory_mb(device)})
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
