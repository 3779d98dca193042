"""Stage `preference`: context-conditioned preference data with reversals, and a context-aware reward model
(arXiv 2407.14916).

Builder (Dask-parallel over input files): pairwise exports (`prompt`, `chosen`, `rejected`), RPR-style
rows (`prompt`, `response_a`, `response_b`, `criteria_x|y`, `scenario_x|y`), and the sample world. Each
pair gets contexts from (a) its own context columns, (b) the criteria library
(`configs/libraries/criteria.yaml`)
matched by a feature scorer on the pair's own features, (c) optionally a local instruct LM by path; one
context per normalised text. Every (pair, context) becomes two
records, one per response order, so labels are balanced and position carries no signal; every pair also
gets a no-context record. Exact and near-duplicate pairs are removed, splits are by prompt.

Reward model: `AutoModelForSequenceClassification` (one scalar) from the bootstrap model, Bradley-Terry
loss on `[context] [prompt] [response]` (truncated so the response is never cut), and a context-blind
baseline trained the same way on the same records without contexts. Splits are by prompt and, for contexts,
by phrasing: test records use only wordings no training record has, as many per pole of every axis
(`heldout_phrasings`), so a context-blind model scores chance on them. Metrics, each with a Wilson interval
and its chance line: joint accuracy on reversal pairs (right under both contexts at once), context-
conditioned accuracy (aware vs. blind: the paper's claim is the gap), no-context accuracy on pairs with a
context-free winner only; an in-distribution diagnostic (held-out prompts under training phrasings) beside
them. Ties count as wrong. Deviation: RPR's `profile_*` columns carry no label of which response they
favour, so they are not used as contexts; RPR pairs get no no-context record (no context-free label).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.preference_contexts import (
    CONTEXT_TYPES,
    library_contexts,
    lm_contexts,
    load_context_lm,
    load_library,
    unique_contexts,
)
from tracecore.tasks.preference_splits import heldout_phrasings, split_of
from tracecore.tasks.reward_model import RM_KINDS, accuracy_png, evaluate, scorer, train_and_score
from tracecore.tasks.runtime.common import log_dropped
from tracecore.tasks.runtime.stage import Stage, StageRun
from tracecore.tasks.text import jaccard, normalize_text, word_ngrams, words


class PreferenceInput(Strict):
    path: str
    format: Literal["pairwise", "rpr", "sample"] = "pairwise"


class PreferenceConfig(Strict):
    """Context-conditioned preference data with reversals and a context-aware reward model."""

    inputs: list[PreferenceInput] = Field(default_factory=list,
                                          description="empty = the sample world's pairs")
    criteria_library: str | None = Field(
        "builtin", description="YAML path; builtin = configs/libraries/criteria.yaml; null = none")
    context_lm_path: str | None = Field(None, description=(
        "local instruct LM that proposes criteria (folder, .gguf or packaged model, e.g. "
        "smollm2-135m-instruct); its contexts are tagged `lm`"))
    context_lm_max_pairs: int | None = Field(None, ge=1, description=(
        "pairs per input file that get LM contexts, the first ones (two greedy generations each: seconds per "
        "pair on a CPU); None = all"))
    context_lm_template: str = ("Prompt: {prompt}\nResponse A: {a}\nResponse B: {b}\n"
                                "One criterion that tells these responses apart:")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of prompts held out")
    context_test_fraction: float = Field(0.3, gt=0, lt=1, description="share of context phrasings held out: "
                                         "test records use only phrasings no training record has")
    rm_epochs: int = Field(3, ge=1)
    rm_lr: float = Field(1e-4, gt=0, lt=1)
    rm_batch_size: int = Field(16, ge=1)
    rm_max_len: int = Field(128, ge=16)
    rm_lora: bool = False
    rm_target_modules: list[str] | None = Field(None, description="LoRA targets with rm_lora; None = the "
                                                "architecture's attention projections")
    threads: int = Field(1, ge=0, description="torch threads per Dask worker; the context-aware and the "
                         "context-blind reward models train as two shards, in parallel; 0 = torch default")
    seed: int = 0


RECORD_SCHEMA = pa.schema([(c, pa.string()) for c in ("prompt", "context", "context_type", "response_a",
                                                        "response_b", "preferred", "pair_id", "source",
                                                        "split")])
REJECT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])
# test: held-out prompts under held-out phrasings (the metrics); test_seen_phrasing: held-out prompts under
# training phrasings, an in-distribution diagnostic reported beside them (`*_seen_phrasing` rows)
SPLITS = ("train", "test", "test_seen_phrasing")
# ---- parsing and validation ---------------------------------------------------------------------
def to_pair(rec: object, fmt: str) -> tuple[dict | None, str | None]:
    """Normalize a row to {prompt, a, b, default, contexts: [(text, type, preferred, source)]} or a reason."""
    if not isinstance(rec, dict):
        return None, f"record is a {type(rec).__name__}, not an object"
    names = {"pairwise": ("chosen", "rejected"), "sample": ("chosen", "rejected"),
             "rpr": ("response_a", "response_b")}
    if fmt not in names:
        return None, f"unknown input format {fmt!r}"
    ka, kb = names[fmt]
    missing = [k for k in ("prompt", ka, kb) if k not in rec]
    if missing:
        return None, f"missing field(s) {missing}"
    prompt, a, b = rec["prompt"], rec[ka], rec[kb]
    if not all(isinstance(x, str) for x in (prompt, a, b)):
        return None, "prompt and responses must be strings"
    if not prompt.strip() or not a.strip() or not b.strip():
        return None, "empty prompt or response"
    if a.strip() == b.strip():
        return None, "identical responses"
    contexts = []
    if fmt == "sample":  # one criterion or a list of phrasings per side
        for side, key in (("a", "criteria_chosen"), ("b", "criteria_rejected")):
            value = rec.get(key)
            contexts += [(c, "criteria", side, "input")
                         for c in (value if isinstance(value, list) else [value])]
    if fmt == "rpr":
        for kind in ("criteria", "scenario"):
            contexts += [(rec.get(f"{kind}_x"), kind, "a", "input"),
                         (rec.get(f"{kind}_y"), kind, "b", "input")]
    for ctx in rec.get("contexts", []) or []:  # explicit list: {context, type, preferred}
        if not isinstance(ctx, dict) or ctx.get("type") not in CONTEXT_TYPES[:3]:
            return None, f"unknown context type {ctx.get('type') if isinstance(ctx, dict) else ctx!r}"
        if ctx.get("preferred") not in ("a", "b"):
            return None, f"label {ctx.get('preferred')!r} outside {{a, b}}"
        contexts.append((ctx.get("context"), ctx["type"], ctx["preferred"], "input"))
    contexts = [c for c in contexts if isinstance(c[0], str) and c[0].strip()]
    # a context-free winner exists for a pairwise export's chosen side and a sample pair marked not reversible
    # (its factual pairs); RPR pairs and reversible pairs have none, so they get no no-context record
    default = "a" if fmt == "pairwise" or (fmt == "sample" and rec.get("reversible") is False) else None
    return {"prompt": prompt, "a": a, "b": b, "default": default, "contexts": contexts}, None


def read_lines(path: str) -> list[tuple[int, object]]:
    import fsspec

    rows = []
    with fsspec.open(path, "rb", compression="infer") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rows.append((line_no, json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as exc:
                rows.append((line_no, f"non-UTF-8 bytes at byte {exc.start}"))
            except json.JSONDecodeError as exc:
                rows.append((line_no, f"bad JSON: {exc.msg}"))
    return rows


def parse_input(store_uri: str, ref: str, shard: int, item: tuple, cfg: PreferenceConfig) -> dict:
    """One input file -> normalized pairs (with contexts) + rejects, as one shard each."""
    store = ArtifactStore(store_uri)
    path, fmt, rejects_ref = item
    library = load_library(cfg.criteria_library)
    lm = load_context_lm(cfg.context_lm_path, store) if cfg.context_lm_path else None
    pairs, rejects = [], []
    for line, rec in read_lines(path):
        pair, reason = (None, rec) if isinstance(rec, str) else to_pair(rec, fmt)
        if reason:
            rejects.append({"file": path, "line": line, "reason": reason})
            continue
        contexts = pair["contexts"] + library_contexts(pair, library)
        if lm is not None and (cfg.context_lm_max_pairs is None or len(pairs) < cfg.context_lm_max_pairs):
            contexts += lm_contexts(pair, lm, cfg.context_lm_template)
        pairs.append({"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"], "default": pair["default"],
                      "contexts": json.dumps(sorted(unique_contexts(contexts))),
                      "source": f"{Path(path).name}:{line}"})
    store.write_shard(rejects_ref, shard, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    schema = pa.schema([(k, pa.string()) for k in ("prompt", "a", "b", "default", "contexts", "source")])
    return store.write_shard(ref, shard, pa.Table.from_pylist(pairs, schema=schema), rejects=len(rejects))


# ---- dataset assembly ---------------------------------------------------------------------------
def shingles(text: str, k: int = 3) -> set[str]:
    """Word k-shingles (the shared tokeniser and windower: case and punctuation do not make a pair new)."""
    return set(word_ngrams(words(text), k))


def dedup_pairs(pairs: list[dict], threshold: float) -> tuple[list[dict], int, int]:
    """Drop exact duplicates (same prompt and response set) and near-duplicates (Jaccard of word
    3-shingles >= threshold) among pairs with the same prompt; first occurrence wins."""
    kept, exact, near, seen, by_prompt = [], 0, 0, set(), {}
    for p in pairs:
        key = (p["prompt"], frozenset((p["a"], p["b"])))
        if key in seen:
            exact += 1
            continue
        sh = shingles(" ".join((p["prompt"], *sorted((p["a"], p["b"])))))
        if any(jaccard(sh, o) >= threshold for o in by_prompt.get(p["prompt"], [])):
            near += 1
            continue
        seen.add(key)
        by_prompt.setdefault(p["prompt"], []).append(sh)
        kept.append(p)
    return kept, exact, near


def expand(pair: dict, split: str, heldout: set[str] | None = None) -> list[dict]:
    """Records for every (context, order), plus the no-context record in both orders where the pair has a
    context-free winner. With `heldout` (normalised texts), a train pair keeps only the other phrasings, and
    a test pair's other phrasings become the `test_seen_phrasing` diagnostic."""
    pair_id = hashlib.sha256(json.dumps([pair["prompt"],
                                         sorted((pair["a"], pair["b"]))]).encode()).hexdigest()[:16]
    contexts = []
    for c, t, pref, src in json.loads(pair["contexts"]):
        phrasing = split if heldout is None else ("test" if normalize_text(c) in heldout else "train")
        if phrasing == split:
            contexts.append((c, t, pref, src, split))
        elif split == "test":  # a held-out prompt under a training phrasing: the in-distribution diagnostic
            contexts.append((c, t, pref, src, "test_seen_phrasing"))
    if pair["default"]:
        contexts.append(("", "none", pair["default"], "none", split))
    rows = []
    for context, ctype, preferred, source, record_split in contexts:
        for flip in (False, True):
            a, b = (pair["b"], pair["a"]) if flip else (pair["a"], pair["b"])
            label = {"a": "b", "b": "a"}[preferred] if flip else preferred
            rows.append({"prompt": pair["prompt"], "context": context, "context_type": ctype, "response_a": a,
                         "response_b": b, "preferred": label, "pair_id": pair_id, "source": source,
                         "split": record_split})
    return rows


def records(pairs: list[dict], cfg: PreferenceConfig) -> tuple[list[dict], dict[str, int]]:
    """The dataset (every pair expanded under its prompt's split, held-out phrasings balanced per pole) and
    the held-out phrasings' statistics."""
    heldout, stats = heldout_phrasings(pairs, load_library(cfg.criteria_library), cfg.context_test_fraction)
    rows = [row for p in pairs
            for row in expand(p, split_of(p["prompt"], cfg.test_fraction, cfg.seed), heldout)]
    return rows, stats


def reversal_pairs(rows: list[dict]) -> set[str]:
    """Pairs with contexts that prefer different responses (in the original order)."""
    sides: dict[str, set[str]] = {}
    for r in rows:
        if r["context_type"] != "none":
            first = r["preferred"] if r["response_a"] <= r["response_b"] else {"a": "b",
                                                                               "b": "a"}[r["preferred"]]
            sides.setdefault(r["pair_id"], set()).add(first)
    return {p for p, s in sides.items() if len(s) == 2}


def statistics(rows: list[dict], pairs: int, exact: int, near: int, rejected: int,
               heldout: dict[str, int]) -> list[dict]:
    import numpy as np

    lengths = np.array([len(r["response_a"].split()) for r in rows]) if rows else np.zeros(1)
    reversals = reversal_pairs(rows)
    stats = [{"metric": f"records[{t}]", "value": float(sum(r["context_type"] == t for r in rows))}
             for t in CONTEXT_TYPES]
    stats += [{"metric": "pairs", "value": float(pairs)},
              {"metric": "reversal_pairs", "value": float(len(reversals))},
              {"metric": "reversal_rate", "value": len(reversals) / max(pairs, 1)},
              {"metric": "label_a_share",
               "value": sum(r["preferred"] == "a" for r in rows) / max(len(rows), 1)},
              {"metric": "exact_duplicates_removed", "value": float(exact)},
              {"metric": "near_duplicates_removed", "value": float(near)},
              {"metric": "rejected", "value": float(rejected)}]
    stats += [{"metric": f"response_words_p{q}", "value": float(np.percentile(lengths, q))}
              for q in (10, 50, 90)]
    stats += [{"metric": name, "value": float(value)} for name, value in heldout.items()]
    stats += [{"metric": name, "value": float(value)} for name, value in guarantee_violations(rows).items()]
    return stats


def guarantee_violations(rows: list[dict]) -> dict[str, int]:
    """Each guarantee the dataset promises, counted from the records themselves (all must be 0)."""
    orders: dict[tuple, set] = {}
    no_context: dict[str, int] = {}
    splits: dict[str, set] = {}
    for r in rows:
        orders.setdefault((r["pair_id"], r["context"]), set()).add(r["response_a"])
        if r["context_type"] == "none":
            no_context[r["pair_id"]] = no_context.get(r["pair_id"], 0) + 1
        splits.setdefault(r["prompt"], set()).add(r["split"].removesuffix("_seen_phrasing"))
    return {"contexts_missing_an_order": sum(len(o) != 2 for o in orders.values()),
            "no_context_records_not_in_both_orders": sum(n != 2 for n in no_context.values()),
            "prompts_in_two_splits": sum(len(s) > 1 for s in splits.values()),
            "label_imbalance": abs(sum(r["preferred"] == "a" for r in rows) * 2 - len(rows))}


def preference_needs(pipeline_cfg) -> dict[str, str]:
    """The base model (the reward model starts from it); the sample world's pairs unless inputs are given."""
    return {"model": "pretrain.model",
            **({} if pipeline_cfg.preference.inputs else {"sample": "sample.sample"})}


def preference_inputs(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """Fingerprinted: the criteria library's content, the user's input files and context LM (file
    identity)."""
    from tracecore.storage.fs import input_fingerprint, list_input_files

    cfg = pipeline_cfg.preference
    if cfg.rm_lora:
        from tracecore.tasks.models import check_user_lora_targets

        check_user_lora_targets(pipeline_cfg, cfg.rm_target_modules, "preference.rm_target_modules")
    library = json.dumps(load_library(cfg.criteria_library)).encode()
    inputs = {"library": hashlib.sha256(library).hexdigest()[:16]}
    if cfg.inputs:
        files = list_input_files([i.path for i in cfg.inputs], "preference.inputs")
        inputs["inputs"] = input_fingerprint(files)
        pairs = [[i.path, i.format] for i in cfg.inputs]
    else:
        pairs = [[f"{store.files_path(upstream['sample'])}/preferences/pairs.jsonl", "sample"]]
    if cfg.context_lm_path:  # a causal LM transformers knows, checked before any work
        from tracecore.tasks.models import causal_lm_config, model_fingerprint

        causal_lm_config(cfg.context_lm_path, "preference.context_lm_path", store)
        inputs |= {f"context_lm.{k}": v for k, v in model_fingerprint(cfg.context_lm_path,
                                                                      "preference.context_lm_path").items()}
    return inputs, {"pairs_files": pairs}


def run_preference(run: StageRun) -> None:
    store, cfg, log = run.store, run.cfg, run.log
    refs, model_ref, inputs = run.plan.refs, run.inputs["model"], run.args["pairs_files"]
    parsed = run.map("parsed", parse_input, [(path, fmt, refs["rejects"]) for path, fmt in inputs], cfg=cfg)
    run.commit("rejects", expected_shards=len(inputs))
    run.commit("parsed", {"intermediate": True, "seconds": parsed.seconds, "skipped_shards": parsed.skipped},
               expected_shards=len(inputs))
    rejected = sum(m.get("rejects", 0) for m in parsed.markers)
    parsed_pairs = store.read_table(refs["parsed"]).to_pylist()
    pairs, exact, near = dedup_pairs(parsed_pairs, cfg.near_duplicate_threshold)
    log_dropped("preference", "input rows", len(parsed_pairs) + rejected, {
        f"rejected (reasons in {refs['rejects']})": rejected, "exact duplicate pairs": exact,
        f"near-duplicate pairs (Jaccard >= {cfg.near_duplicate_threshold})": near})
    rows, heldout_stats = records(pairs, cfg)
    for shard, split in enumerate(SPLITS):
        store.write_shard(refs["data"], shard, pa.Table.from_pylist([r for r in rows if r["split"] == split],
                                                                    schema=RECORD_SCHEMA))
    run.commit("data", {"pairs": len(pairs), "splits": list(SPLITS)}, expected_shards=len(SPLITS))
    stats = statistics(rows, len(pairs), exact, near, rejected, heldout_stats)
    run.write("stats", pa.Table.from_pylist(stats), {"report_columns": ["metric", "value"]})

    for shard in range(len(RM_KINDS)):  # a model's curve and its scores are one unit of work
        if not (store.shard_done(refs["reward_model"], shard) and store.shard_done(refs["rm_scores"], shard)):
            store.drop_shard(refs["rm_scores"], shard)
    models = [{"kind": kind, "model_ref": model_ref, "data_ref": refs["data"], "rm_ref": refs["reward_model"]}
              for kind in RM_KINDS]
    trained = run.map("rm_scores", train_and_score, models, cfg=cfg)
    run.commit("reward_model", expected_shards=len(RM_KINDS))
    run.commit("rm_scores", {"seconds": trained.seconds}, expected_shards=len(RM_KINDS))
    aware, blind_score = (scorer(store.read_table(refs["rm_scores"]).to_pylist(), kind) for kind in RM_KINDS)
    table = evaluate(aware, blind_score, [r for r in rows if r["split"] == "test"])
    seen = [r for r in rows if r["split"] == "test_seen_phrasing"]
    table += [{**r, "metric": f"{r['metric']}_seen_phrasing"}
              for r in evaluate(aware, blind_score, seen) if r["metric"] == "context_conditioned"]
    store.write_file(refs["accuracy"], "plots/accuracy.png", accuracy_png(table))
    run.write("accuracy", pa.Table.from_pylist(table), {
        "plots": ["plots/accuracy.png"],
        "report_columns": ["metric", "model", "context_type", "n", "accuracy", "lo", "hi", "chance",
                           "blind_ceiling"]})
    for r in table:
        if r["context_type"] == "all":
            log.info("preference %s %s accuracy %.3f [%.3f, %.3f] (n=%d)", r["metric"], r["model"],
                     r["accuracy"], r["lo"], r["hi"], r["n"])


STAGE = Stage("preference", PreferenceConfig,
              {"accuracy": "preference_eval", "data": "preference_data", "parsed": "preference_parsed",
               "rejects": "preference_rejects", "stats": "preference_stats", "reward_model": "reward_model",
               "rm_scores": "preference_rm_scores"}, run_preference, needs=preference_needs,
              external=preference_inputs,
              description="context-conditioned preference data + context-aware RM")
