"""README tables generated from a run, so the measured figures cannot go stale.

The README marks each measured table with `<!-- tracecore:begin NAME -->` … `<!-- tracecore:end NAME -->`;
`tracecore readme [RUN_ID]` re-renders every marked block from that run's artifacts (the latest run by
default) and `--check` exits non-zero when a block differs (the full acceptance target runs it). A block
names the run and its calibration, so every figure carries the machine it came from.
"""

from __future__ import annotations

import re

from tracecore.flows.report import markdown_table
from tracecore.storage.store import ArtifactStore

BLOCK = re.compile(r"(<!-- tracecore:begin (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- tracecore:end "
                   r"(?P=name) -->)",
                   re.DOTALL)
SUBSET_NAMES = {"tagcos": "TAGCOS 5 %", "random": "random 5 %", "cluster_random": "cluster-random 5 %",
                "full": "full pool", "tagcos-random": "TAGCOS − random (paired by seed)"}


def _ref(record: dict, stage: str, key: str) -> str | None:
    return record["stages"].get(stage, {}).get("refs", {}).get(key)


def _rows(store: ArtifactStore, record: dict, stage: str, key: str) -> list[dict]:
    ref = _ref(record, stage, key)
    if not ref or not store.is_committed(ref):
        raise LookupError(f"run {record['run_id']} has no committed {stage}.{key} artifact")
    return store.read_table(ref).to_pylist()


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _with_interval(row: dict, digits: int, lo: str = "lo", hi: str = "hi", mean: str = "mean") -> str:
    fmt = _signed if row.get("scale") == "difference" else (lambda x, d: f"{x:.{d}f}")
    if row.get("seeds", 2) < 2 or row[lo] == row[hi] == row[mean]:
        return fmt(row[mean], digits)
    return f"{fmt(row[mean], digits)} [{fmt(row[lo], digits)}, {fmt(row[hi], digits)}]"


def calibration_text(record: dict) -> str:
    c = record.get("calibration")
    if not c:
        return "calibration not recorded"
    return (f"fp32 matmul {c['matmul_gflops']:.0f} GFLOP/s on {c['torch_threads']} threads "
            f"({c['matmul_gflops_1thread']:.0f} on 1), load {c['load_1min']:.1f} before")


def render_timings(store: ArtifactStore, record: dict) -> str:
    """Stage wall-clock seconds of the run, the total, and the calibration measured at its start."""
    from tracecore.tasks.runtime.registry import STAGES

    stages = {s: record["stages"][s] for s in STAGES
              if isinstance(record["stages"].get(s, {}).get("seconds"), (int, float))}
    rows = [{"stage": s, "seconds": f"{i['seconds']:.0f}", "status": i.get("status", "")} for s,
            i in stages.items()]
    total = record.get("wall_seconds") or sum(i["seconds"] for i in stages.values())
    rows.append({"stage": "**whole run**", "seconds": f"**{total:.0f}** ({total / 60:.1f} min)",
                 "status": ""})
    return (f"Run `{record['run_id']}`, profile `{record['config'].get('profile')}`; "
            f"{calibration_text(record)}.\n\n"
            + markdown_table(rows, ["stage", "seconds", "status"]))


def render_verdict(store: ArtifactStore, record: dict) -> str:
    """Held-out instruction loss and MC accuracy per subset, with intervals, and TAGCOS − random; each
    subset's
    training steps beside it, because the full pool trains longer than the coresets (unequal compute)."""
    by = {(r["subset"], r["metric"]): r for r in _rows(store, record, "eval", "verdict")}
    steps: dict[str, set[int]] = {}
    for r in _rows(store, record, "finetune", "finetune"):
        steps.setdefault(r["subset"], set()).add(int(r["steps"]))
    order = [s for s in SUBSET_NAMES if (s, "instruction_loss") in by]
    rows = []
    for subset in order:
        loss, acc = by[(subset, "instruction_loss")], by[(subset, "mc_accuracy")]
        name = SUBSET_NAMES[subset] + (f" ({loss['seeds']} seed{'s' * (loss['seeds'] > 1)})"
                                       if subset != "tagcos-random"
                                       else "")
        chance = f"{acc['chance']:.3f}" if acc.get("chance") is not None else ""
        rows.append({"subset": name, "training steps": "–".join(map(str, sorted(steps.get(subset, ())))),
                     "held-out loss": _with_interval(loss, 3), "MC accuracy": _with_interval(acc, 3),
                     "MC chance": chance, "note": acc.get("note") or ""})
    return markdown_table(rows, ["subset", "training steps", "held-out loss", "MC accuracy", "MC chance",
                                 "note"])


def render_families(store: ArtifactStore, record: dict) -> str:
    """Each instruction family's share of the pool and of every selection."""
    heads = {"pool": "pool", "tagcos": "TAGCOS", "cluster_random": "cluster-random", "random": "random"}
    rows = [{"family": r["family"], **{head: f"{100 * r[k]:.1f} %" for k, head in heads.items()}}
            for r in _rows(store, record, "select", "families")]
    return markdown_table(rows, ["family", *heads.values()])


def render_selection_quality(store: ArtifactStore, record: dict) -> str:
    """Low-quality and near-duplicate rates of the pool and each selection (sample-world flags)."""
    manifest = store.manifest(_ref(record, "select", "coreset"))
    rates, n = manifest["rates"], manifest["selected"]
    residual = {"tagcos": manifest["mean_residual_tagcos"],
                "cluster_random": manifest["mean_residual_cluster_random"]}
    names = {"pool": "pool", "tagcos": "TAGCOS", "cluster_random": "cluster-random (same budgets; all draws)",
             "random": "random (all draws)"}
    rows = [{"selection": names[k], "size": manifest["records"] if k == "pool" else n,
             "low-quality rate": _rate(rates[k], "low_quality"),
             "near-duplicate rate": _rate(rates[k], "near_duplicate"),
             "centroid residual (what OMP minimises)": f"{residual[k]:.3f}" if k in residual else "–"}
                 for k in names]
    return markdown_table(rows, ["selection", "size", "low-quality rate", "near-duplicate rate",
                                 "centroid residual (what OMP minimises)"])


def _rate(r: dict, flag: str) -> str:
    """`3.1 % [1.1, 8.8] (p 0.27)`: the rate, its Wilson interval and the one-sided p against the pool's
    rate."""
    text = f"{100 * r[f'{flag}_rate']:.1f} %"
    if f"{flag}_lo" in r:
        text += f" [{100 * r[f'{flag}_lo']:.1f}, {100 * r[f'{flag}_hi']:.1f}]"
    if f"{flag}_p_below_pool" in r:
        text += f" (p {r[f'{flag}_p_below_pool']:.2f})"
    return text


def render_memorization(store: ArtifactStore, record: dict) -> str:
    """Spearman ρ of model log-prob vs. task-gram counts per model and task, with bootstrap intervals over
    items, and the share of the indexed corpus the model saw (none for a model pretrained elsewhere)."""
    def share(value) -> str:  # a model pretrained elsewhere: its ρ measures overlap with this corpus only
        return "not its pretraining corpus" if value is None else f"{100 * value:.0f} %"

    rows = [{"model": r["model"], "task": r["task"], "items (co-occurring)": r["items_cooccurring"],
             "targets with co-occurring pairs": r["n_cooccurring"],
             "ρ (task-gram)": f"{r['spearman']:.2f} [{r['spearman_lo']:.2f}, {r['spearman_hi']:.2f}]",
             "all targets": r["n_all"],
             "ρ all (smoothed)": f"{r['spearman_all']:.2f} [{r['spearman_all_lo']:.2f}, "
                                 f"{r['spearman_all_hi']:.2f}]",
             "Kendall-τ distance": f"{r['kendall_tau_distance']:.2f}",
             "ρ (∞-gram)": f"{r['infgram_spearman']:.2f}",
             "index seen in training": share(r.get("corpus_share_seen"))}
            for r in _rows(store, record, "memorization", "scores")]
    return markdown_table(rows, list(rows[0]) if rows else ["task"])


def render_reward_model(store: ArtifactStore, record: dict) -> str:
    """Held-out reward-model accuracies with Wilson intervals, joint reversal first, each beside its chance
    line
    (a coin per record) and the best a context-ignoring scorer could reach on the same records."""
    def line(value) -> str:
        return "–" if value is None else f"{value:.3f}"

    rows = [{"metric": r["metric"], "contexts": r["context_type"], "model": r["model"], "n": r["n"],
             "accuracy": f"{r['accuracy']:.3f}", "95 % CI": f"[{r['lo']:.3f}, {r['hi']:.3f}]",
             "chance": line(r.get("chance")), "blind ceiling": line(r.get("blind_ceiling"))}
            for r in _rows(store, record, "preference", "accuracy") if r.get("n")]
    return markdown_table(rows, ["metric", "contexts", "model", "n", "accuracy", "95 % CI", "chance",
                                 "blind ceiling"])


def render_long_context(store: ArtifactStore, record: dict) -> str:
    """Needle accuracy per method and length, with KV bytes relative to full attention."""
    table = _rows(store, record, "eval", "long_context")
    lengths = sorted({r["length"] for r in table})
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["length"]): r for r in table}
    rows = []
    for m in methods:
        row = {"method": m,
               **{str(n): f"{cell[(m, n)]['accuracy']:.3f}" if (m, n) in cell else "" for n in lengths}}
        last = cell.get((m, lengths[-1]))
        row[f"KV vs. full at {lengths[-1]}"] = f"{last['kv_vs_full']:.3f}" if last else ""
        rows.append(row)
    return markdown_table(rows, ["method", *map(str, lengths), f"KV vs. full at {lengths[-1]}"])


def render_long_context_models(store: ArtifactStore, record: dict) -> str:
    """Per extra model and method: needle accuracy per length with its Wilson interval and needle count, and
    the
    KV bytes held (measured from the caches) relative to full attention at the longest length."""
    table = _rows(store, record, "eval", "long_context_models")
    lengths = sorted({r["length"] for r in table})
    cell = {(r["model"], r["method"], r["length"]): r for r in table}
    rows = []
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in table):
        row = {"model": model, "method": method}
        for n in lengths:
            r = cell.get((model, method, n))
            row[str(n)] = f"{r['accuracy']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] ({r['needles']})" if r else ""
        last = cell.get((model, method, lengths[-1]))
        has_kv = last and last["kv_vs_full"]
        row[f"KV vs. full at {lengths[-1]}"] = f"{last['kv_vs_full']:.3f}" if has_kv else ""
        rows.append(row)
    heads = [f"KV vs. full at {lengths[-1]}"] if lengths else []
    return markdown_table(rows, ["model", "method", *map(str, lengths), *heads])


def render_contamination(store: ArtifactStore, record: dict) -> str:
    """Per task: items contaminated (13-word n-grams, Wilson interval), how much of a question the corpus
    holds."""
    rows = [{"task": r["task"], "items": r["items"], "judged": r["judged"], "contaminated": r["contaminated"],
             "share [95 % CI]": f"{r['share'] or 0:.3f} [{r['share_lo']:.3f}, {r['share_hi']:.3f}]",
             "median question words": r["median_question_words"],
             "median longest question span (words)": r["median_question_span"],
             "answers found whole": f"{100 * r['answer_found']:.0f} %",
             "contaminating documents": r["documents"] or "–"} for r in _rows(store, record, "trace",
                                                                              "tasks")]
    return markdown_table(rows, list(rows[0]) if rows else ["task"])


def near_duplicate_counts(store: ArtifactStore, record: dict) -> dict | None:
    """Ingest's near-dedup figures from its manifests, and the sample world's planted truth where it has one
    (None when the run did not near-dedup)."""
    ref = _ref(record, "ingest", "near_duplicates")
    if not ref or not store.is_committed(ref):
        return None
    removed = store.read_table(ref).to_pylist()
    docs = store.manifest(_ref(record, "ingest", "documents"))
    out = {"removed": len(removed), "clusters": docs.get("near_duplicate_clusters", 0),
           "read": docs.get("documents_read", 0), "threshold": store.manifest(ref).get("threshold")}
    sample = _ref(record, "sample", "sample")
    truth_path = f"{store.files_path(sample)}/ground_truth/near_duplicates.parquet" if sample else None
    if truth_path and store.fs.exists(truth_path):
        import pyarrow.parquet as pq

        with store.fs.open(truth_path, "rb") as fh:
            truth = pq.ParquetFile(fh).read().to_pylist()
        planted = {t["id"]: t["source_id"] for t in truth if t["jaccard"] >= out["threshold"]}
        found = {r["id"]: r["cluster"] for r in removed}
        out |= {"planted": len(planted), "recall": sum(found.get(k) == v for k, v in planted.items()),
                "false": sum(1 for k in found if k not in planted)}
    return out


def render_near_duplicates(store: ArtifactStore, record: dict) -> str:
    """Near-duplicate removal in ingest: documents read and removed, clusters, and against the sample
    world's planted near-copies the ones found with their source and the ones removed that were not
    planted."""
    c = near_duplicate_counts(store, record)
    if c is None:
        return "_near-duplicate removal was off in this run (`ingest.near_dedup.enabled`)_"
    row = {"documents read": c["read"], "near-duplicates removed": c["removed"], "clusters": c["clusters"],
           "threshold (Jaccard)": c["threshold"]}
    if "planted" in c:
        row |= {"planted copies at or above it": c["planted"], "found with their source": c["recall"],
                "removed, not planted": c["false"]}
    return markdown_table([row], list(row))


def render_output_coverage(store: ArtifactStore, record: dict) -> str:
    """Per checkpoint: greedy generations traced, tokens, and the share inside corpus spans with its
    bootstrap interval."""
    rows = [{"checkpoint": r["model"], "generations": r["generations"], "tokens": r["tokens"],
             "covered [95 % CI]": f"{r['covered']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]",
             "spans per generation": f"{r['mean_spans']:.1f}", "longest span (tokens)": r["longest_span"]}
            for r in _rows(store, record, "eval", "creativity")]
    return markdown_table(rows, list(rows[0]) if rows else ["checkpoint"])


def render_headline(store: ArtifactStore, record: dict) -> str:
    """The README's few headline results of the default run, each linking to the docs page with its full table
    (deterministic figures only: the wall clock is on the performance page)."""
    rows = []
    by = {(r["subset"], r["metric"]): r for r in _rows(store, record, "eval", "verdict")}
    if ("tagcos-random", "instruction_loss") in by:
        rows.append({"result": "Data selection: TAGCOS − random, held-out instruction loss (paired by seed)",
                     "figure": _with_interval(by[("tagcos-random", "instruction_loss")], 3),
                     "details": "[results](docs/results.md#verdict)"})
    acc = {(r["metric"], r["context_type"], r["model"]): r for r in _rows(store, record, "preference",
                                                                          "accuracy")
           if r.get("n")}
    aware, blind = acc.get(("context_conditioned", "all", "context_aware")), acc.get(
        ("context_conditioned", "all", "context_blind"))
    if aware and blind:
        rows.append({"result": "Reward model on unseen context phrasings: context-aware vs. context-blind "
                     "accuracy",
                     "figure": f"{aware['accuracy']:.3f} [{aware['lo']:.3f}, {aware['hi']:.3f}] vs. "
                               f"{blind['accuracy']:.3f} [{blind['lo']:.3f}, {blind['hi']:.3f}]",
                     "details": "[results](docs/results.md#reward_model)"})
    scores = _rows(store, record, "memorization", "scores")
    if scores:
        own = [r for r in scores if r["model"] == scores[0]["model"]]
        rows.append({"result": f"Memorization: Spearman ρ of `{own[0]['model']}` vs. task-gram counts, per "
                     f"task",
                     "figure": ", ".join(f"{r['task']} {r['spearman']:.2f}" for r in own),
                     "details": "[results](docs/results.md#memorization)"})
    contaminated = [r for r in _rows(store, record, "trace", "tasks") if r["contaminated"]]
    if contaminated:
        rows.append({"result": "Contaminated task items (13-word n-grams in the corpus)",
                     "figure": ", ".join(f"{r['task']} {r['contaminated']}/{r['judged']}"
                                         for r in contaminated),
                     "details": "[results](docs/results.md#contamination)"})
    near = near_duplicate_counts(store, record)
    if near and "planted" in near:
        rows.append({"result": "Near-duplicates (MinHash-LSH, Jaccard >= 0.8): planted copies found with "
                               "their source; removed, not planted",
                     "figure": f"{near['recall']}/{near['planted']}; {near['false']}",
                     "details": "[results](docs/results.md#near_duplicates)"})
    coverage = {r["model"]: r for r in _rows(store, record, "eval", "creativity")} if _ref(
        record, "eval", "creativity") else {}
    if "base" in coverage:
        rows.append({"result": "Greedy generations inside corpus spans (share of tokens), base model",
                     "figure": _with_interval(coverage["base"], 3, mean="covered"),
                     "details": "[results](docs/results.md#output_coverage)"})
    long = _rows(store, record, "eval", "long_context_models")
    if long:
        longest = max(r["length"] for r in long)
        cell = {r["method"]: r for r in long if r["length"] == longest and r["model"] == long[0]["model"]}
        shown = [m for m in ("full", "razor", "rag_top1") if m in cell]
        rows.append({"result": f"Needle retrieval, `{long[0]['model']}` at {longest} tokens: "
                               + " / ".join(shown),
                     "figure": " / ".join(f"{cell[m]['accuracy']:.2f} ({cell[m]['needles']})" for m in shown),
                     "details": "[kernels and long context](docs/kernels.md#long_context_models)"})
    return markdown_table(rows, ["result", "figure", "details"])


RENDERERS = {"headline": render_headline, "contamination": render_contamination, "timings": render_timings,
             "verdict": render_verdict, "families": render_families,
             "selection_quality": render_selection_quality, "memorization": render_memorization,
             "reward_model": render_reward_model, "long_context": render_long_context,
             "long_context_models": render_long_context_models, "near_duplicates": render_near_duplicates,
             "output_coverage": render_output_coverage}


def update_readme(text: str, store: ArtifactStore, record: dict) -> tuple[str, list[str]]:
    """(new text, names of blocks that changed). An unknown block name is an error, not silently kept."""
    changed = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"README block {name!r} has no renderer (known: {sorted(RENDERERS)})")
        body = RENDERERS[name](store, record).rstrip("\n") + "\n"
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed
