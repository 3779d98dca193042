"""Every checkpoint's greedy generations on held-out prompts traced back to the pre-training corpus (the eval
stage's output tracing, one Dask task per checkpoint), and per checkpoint the share of generated tokens that
occurring spans cover.

A library module of `eval`: the tracing itself is `tasks/output_trace.py` (maximal spans through the
engine's `attribute()`, coverage through `creativity()`), shared with `tracecore trace text`. A generation
is re-tokenized as running text with the index's tokenizer, so a model with another tokenizer is traced the
same way. The share is token-weighted over a checkpoint's generations; its interval is a percentile bootstrap
over generations (inside [0, 1] by construction).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.eval_quality import generate, held_out_instructions, load_checkpoint, prompt_ids
from tracecore.tasks.instructions import load_pool
from tracecore.tasks.plots import figure_png, subplots
from tracecore.tasks.runtime.common import set_torch_threads

if TYPE_CHECKING:  # the type only: the stage's config is not code this library runs
    from tracecore.tasks.eval import EvalConfig

TRACE_SCHEMA = pa.schema([("model", pa.string()), ("subset", pa.string()), ("seed", pa.int64()),
                          ("prompt", pa.string()), ("generation", pa.string()), ("tokens", pa.int64()),
                          ("covered", pa.float64()), ("spans", pa.int64()), ("longest_span", pa.int64()),
                          ("trace", pa.string())])


def held_out_prompts(sample_dir: str, pool_path: str, n: int) -> list[dict]:
    """The first `n` held-out instructions (disjoint from the fine-tuning pool), spread over the set."""
    held_out = held_out_instructions(sample_dir, load_pool(pool_path)[0])
    return held_out[:: max(1, len(held_out) // max(n, 1))][:n]


def trace_rows(store: ArtifactStore, index_ref: str, labels: dict, prompts: list[dict], texts: list[str],
               cfg: EvalConfig) -> list[dict]:
    """One row per generation: its coverage, span count, longest span and the whole trace (JSON)."""
    from tracecore.tasks.index_query import opened
    from tracecore.tasks.output_trace import trace_output

    s, rows = cfg.output_trace, []
    with opened(store, index_ref) as (engine, tok):
        for prompt, text in zip(prompts, texts):
            traced = trace_output(store, index_ref, engine, tok, text, s.min_span, s.max_span_count,
                                  s.max_docs)
            rows.append({**labels, "prompt": f"{prompt['instruction']} {prompt.get('input', '')}".strip(),
                         "generation": text, "tokens": traced["tokens"], "covered": traced["covered"],
                         "spans": len(traced["spans"]),
                         "longest_span": max((sp["tokens"] for sp in traced["spans"]), default=0),
                         "trace": json.dumps(traced["spans"])})
    return rows


def trace_checkpoint(store_uri: str, ref: str, shard: int, item: dict, cfg: EvalConfig,
                     index_ref: str) -> dict:
    """A checkpoint's greedy generations on the held-out prompts, each traced to the corpus."""
    set_torch_threads(cfg.threads)
    store = ArtifactStore(store_uri)
    tok, model = load_checkpoint(store, item["model_ref"])
    prompts = held_out_prompts(store.files_path(item["sample_ref"]), item["pool_path"],
                               cfg.output_trace.prompts)
    settings = cfg.output_trace
    texts = generate(model, tok, [prompt_ids(tok, p["instruction"], p.get("input", "")) for p in prompts],
                     settings.max_new_tokens, 0 if settings.stop_at_eos else settings.max_new_tokens)
    labels = {k: item[k] for k in ("model", "subset", "seed")}
    rows = trace_rows(store, index_ref, labels, prompts, texts, cfg)
    table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
    return store.write_shard(ref, shard, table, records=table.num_rows)


def coverage_summary(rows: list[dict], confidence: float, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Per checkpoint: generations, tokens, the token-weighted share covered, and its bootstrap interval."""
    rng, out = np.random.default_rng(seed), []
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        tokens = np.array([r["tokens"] for r in own], float)
        covered = np.array([r["covered"] for r in own]) * tokens
        draws = rng.integers(0, len(own), size=(resamples, len(own)))
        shares = covered[draws].sum(1) / np.maximum(tokens[draws].sum(1), 1)
        lo, hi = np.quantile(shares, [(1 - confidence) / 2, (1 + confidence) / 2])
        out.append({"model": model, "subset": own[0]["subset"], "generations": len(own),
                    "tokens": int(tokens.sum()), "covered": float(covered.sum() / max(tokens.sum(), 1)),
                    "lo": float(lo), "hi": float(hi), "mean_spans": float(np.mean([r["spans"] for r in own])),
                    "longest_span": int(max(r["longest_span"] for r in own))})
    return out


def coverage_png(summary: list[dict], min_span: int) -> bytes:
    """The covered share per checkpoint with its interval."""
    fig, ax = subplots(figsize=(max(4, 0.45 * len(summary) + 1), 3))
    x = np.arange(len(summary))
    share = np.array([s["covered"] for s in summary])
    err = np.array([[s["covered"] - s["lo"] for s in summary], [s["hi"] - s["covered"] for s in summary]])
    ax.bar(x, share, yerr=err, capsize=3, color="#4c72b0")
    ax.set_xticks(x, [s["model"] for s in summary], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"tokens in corpus spans >= {min_span}")
    ax.set_title("greedy generations traced to the corpus")
    return figure_png(fig)
