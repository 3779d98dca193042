"""Deterministic planning: which artifact each stage will produce, computed before any work.

Because refs are fingerprints of (config, inputs, code), the plan tells `tracecore status`
what a run will skip, and lets `--stages tokenize` find its inputs from earlier runs.
"""

from __future__ import annotations

from typing import Any

from tracecore.configs.schema import STAGES, PipelineConfig
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.eval import plan_eval
from tracecore.tasks.finetune import plan_finetune
from tracecore.tasks.gradients import plan_gradients
from tracecore.tasks.ingest import input_fingerprint, list_input_files, plan_ingest
from tracecore.tasks.memorization import plan_memorization
from tracecore.tasks.ngram import plan_ngram
from tracecore.tasks.preference import plan_preference
from tracecore.tasks.pretrain import plan_pretrain
from tracecore.tasks.sample import plan_sample, sample_corpus_glob
from tracecore.tasks.select import plan_select
from tracecore.tasks.tokenize import plan_tokenize

PRIMARY = {"sample": "sample", "ingest": "documents", "tokenize": "tokens", "pretrain": "model", "ngram": "topk",
           "memorization": "scores", "gradients": "features", "select": "coreset", "preference": "eval",
           "finetune": "finetune", "eval": "eval_summary"}
DEPENDS = {"sample": [], "ingest": ["sample"], "tokenize": ["ingest"], "pretrain": ["tokenize"], "ngram": ["tokenize"],
           "memorization": ["ngram", "pretrain"], "gradients": ["pretrain"], "select": ["gradients"],
           "preference": ["pretrain"], "finetune": ["select", "pretrain", "tokenize"],
           "eval": ["finetune", "preference"]}


def stage_call(stage: str, cfg: PipelineConfig, store_uri: str, refs: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments of the stage's `run_*` function (minus store_uri/address), refs included."""
    if stage == "sample":
        return {"cfg": cfg.sample, "refs": plan_sample(cfg.sample)}
    if stage == "ingest":
        if cfg.ingest.paths:
            files = list_input_files(cfg.ingest.paths)
            return {"cfg": cfg.ingest, "files": files, "refs": plan_ingest(cfg.ingest, files)}
        files = list_input_files([sample_corpus_glob(store_uri, refs["sample"])])
        return {"cfg": cfg.ingest, "files": files, "files_id": refs["sample"],
                "refs": plan_ingest(cfg.ingest, files, files_id=refs["sample"])}
    if stage == "tokenize":
        return {"cfg": cfg.tokenize, "documents_ref": refs["documents"],
                "refs": plan_tokenize(cfg.tokenize, refs["documents"])}
    if stage == "pretrain":
        return {"cfg": cfg.pretrain, "tokens_ref": refs["tokens"], "tokenizer_ref": refs["tokenizer"],
                "refs": plan_pretrain(cfg.pretrain, refs["tokens"], refs["tokenizer"])}
    if stage == "ngram":
        return {"cfg": cfg.ngram, "tokens_ref": refs["tokens"], "tokenizer_ref": refs["tokenizer"],
                "refs": plan_ngram(cfg.ngram, refs["tokens"], refs["tokenizer"])}
    if stage == "memorization":
        models = cfg.memorization.models or [refs["model"]]
        return {"cfg": cfg.memorization, "index_ref": refs["index"], "tokenizer_ref": refs["tokenizer"],
                "model_refs": models, "sample_ref": refs["sample"],
                "refs": plan_memorization(cfg.memorization, refs["index"], models, refs["sample"])}
    if stage in ("gradients", "select"):
        pool, pool_id = instruction_pool(cfg, store_uri, refs)
        if stage == "gradients":
            return {"cfg": cfg.gradients, "model_ref": refs["model"], "pool_path": pool, "pool_id": pool_id,
                    "refs": plan_gradients(cfg.gradients, refs["model"], pool_id)}
        return {"cfg": cfg.select, "features_ref": refs["features"], "pool_path": pool,
                "refs": plan_select(cfg.select, refs["features"])}
    if stage == "preference":
        store = ArtifactStore(store_uri)
        inputs = [[i.path, i.format] for i in cfg.preference.inputs] or [
            [f"{store.files_path(refs['sample'])}/preferences/pairs.jsonl", "sample"]]
        inputs_id = refs["sample"] if not cfg.preference.inputs else input_fingerprint(
            list_input_files([i.path for i in cfg.preference.inputs]))
        return {"cfg": cfg.preference, "model_ref": refs["model"], "inputs": inputs, "inputs_id": inputs_id,
                "refs": plan_preference(cfg.preference, refs["model"], inputs_id)}
    if stage == "finetune":
        pool, pool_id = instruction_pool(cfg, store_uri, refs)
        subset_refs = {"tagcos": refs["coreset"], "random": refs["random"], "cluster_random": refs["cluster_random"]}
        return {"cfg": cfg.finetune, "model_ref": refs["model"], "subset_refs": subset_refs, "pool_path": pool,
                "eval_path": eval_split(cfg, store_uri, refs), "tokens_ref": refs["tokens"],
                "refs": plan_finetune(cfg.finetune, refs["model"], subset_refs, pool_id, refs["tokens"])}
    if stage == "eval":
        pool, pool_id = instruction_pool(cfg, store_uri, refs)
        return {"cfg": cfg.eval, "model_ref": refs["model"], "finetune_ref": refs["finetune"],
                "preference_ref": refs["eval"], "sample_ref": refs["sample"], "tokens_ref": refs["tokens"],
                "pool_path": pool, "trained_len": cfg.pretrain.seq_len, "eval_fraction": cfg.pretrain.eval_fraction,
                "refs": plan_eval(cfg.eval, refs["model"], refs["finetune"], refs["eval"], refs["sample"],
                                  refs["tokens"], pool_id)}
    raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")


def instruction_pool(cfg: PipelineConfig, store_uri: str, refs: dict[str, str]) -> tuple[str, str]:
    """The instruction pool file and its identity (the sample artifact, or the file's fingerprint)."""
    if cfg.gradients.pool_path:
        return cfg.gradients.pool_path, input_fingerprint(list_input_files([cfg.gradients.pool_path]))
    return f"{ArtifactStore(store_uri).files_path(refs['sample'])}/instructions/train.jsonl", refs["sample"]


def eval_split(cfg: PipelineConfig, store_uri: str, refs: dict[str, str]) -> str:
    """Held-out instructions: the configured file, or the sample world's eval split."""
    if cfg.finetune.eval_path:
        return cfg.finetune.eval_path
    return f"{ArtifactStore(store_uri).files_path(refs['sample'])}/instructions/eval.jsonl"


def needed_stages(cfg: PipelineConfig) -> list[str]:
    """Selected stages plus the upstream ones they read from (reused when committed, else computed)."""
    needed, todo = set(), list(cfg.stages)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo += DEPENDS[stage]
    return [s for s in STAGES if s in needed]
