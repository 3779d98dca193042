"""Stage `trace`: every task item traced back to the corpus, and test-set contamination flagged.

Beyond the papers, what users of a pretraining corpus ask first (infini-gram's document attribution;
DataTrove's and NeMo Curator's task decontamination):

* **Longest spans** (infini-gram index): for the question and for the answer of every item, the longest
  run of its tokens (tokenized as in running text, with the leading space) that occurs in the corpus, its
  count and up to `max_docs` documents holding it (id, file, line). Occurrence is closed under
  sub-spans, so a two-pointer walk finds the longest span in O(tokens) `count` calls.
* **Contamination** (a corpus scan on Dask, one task per documents shard): the item's text is its question
  followed by its answer (`rule: question_answer`) or the question alone (`rule: question`, NeMo Curator's),
  normalized as in GPT-3 / NeMo Curator (lower case, words = runs of letters and digits, punctuation
  dropped) after undoing reformatting on both sides (`text.match_words`: markup stripped, entities
  decoded, words hyphenated across a line end or by soft hyphens joined, compatibility forms and accents
  folded), so a re-wrapped or re-typeset copy still matches; it is contaminated when one of its n-grams of
  `contamination_n` words (13) occurs in a document. Deviation, for short items (most sample-world items
  have 5-8 words): an item shorter than `contamination_n` words counts as one n-gram, the whole item (as
  DataTrove does for short tasks); items shorter than `min_words` are not judged, and are counted and
  logged as such.
  The scan is exact (n-grams compared as strings), not a Bloom filter. An n-gram found in more than
  `max_matches` documents is ignored (NeMo Curator's cap on boilerplate n-grams).

Outputs: `items` (one row per item), `tasks` (share contaminated per task, with a Wilson interval and
the documents), `hits` (one row per item x document), `rejects` (unusable task rows), a plot, and with
`decontaminate: true` a `documents_decontaminated` artifact for a later training run (`ingest.paths` can
read its Parquet shards): the contaminating documents dropped (`decontaminate_mode: drop_document`), or the
matched n-grams cut with `remove_margin` characters each side and the documents split there (`remove_span`,
GPT-3 / NeMo Curator: pieces under `min_piece_chars` go, a document split over `max_splits` times goes).
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.intervals import wilson
from tracecore.tasks.plots import figure_png, subplots
from tracecore.tasks.runtime.common import log_dropped
from tracecore.tasks.runtime.stage import Planned, Stage, StageRun, plan_artifact
from tracecore.tasks.taskfiles import TaskSpec, load_task
from tracecore.tasks.text import match_spans, match_words, word_ngrams, words


class TraceConfig(Strict):
    """Trace task items back to the corpus (stage `trace`): longest spans with their documents, n-gram
    contamination as in GPT-3 / NeMo Curator."""

    tasks: list[TaskSpec] | None = Field(None, description="task files to trace; None = memorization.tasks")
    max_items: int = Field(0, ge=0, description="items per task; 0 = every item")
    contamination_n: int = Field(13, ge=1, le=64, description=(
        "an item is contaminated when it shares an n-gram of this many words with a document (GPT-3: 13)"))
    min_words: int = Field(5, ge=1, description=(
        "an item shorter than contamination_n words counts as contaminated only when it occurs whole; items "
        "shorter than this are not judged (counted and logged)"))
    max_docs: int = Field(3, ge=1, le=1000, description="documents listed per span and per contaminated item")
    rule: Literal["question_answer", "question"] = Field("question_answer", description=(
        "the text an item's n-grams come from: question + answer, or the question alone (NeMo Curator)"))
    max_matches: int | None = Field(None, ge=1, description=(
        "ignore an n-gram found in more documents than this (NeMo Curator's max_matches: boilerplate); None "
        "= no cap"))
    decontaminate: bool = Field(False,
                                description="also write documents_decontaminated for a later training run")
    decontaminate_mode: Literal["drop_document", "remove_span"] = Field("drop_document", description=(
        "drop each contaminating document, or cut the matched n-grams +- remove_margin characters and split "
        "it"))
    remove_margin: int = Field(200, ge=0, description="characters removed each side of a match (GPT-3: 200)")
    min_piece_chars: int = Field(200, ge=0,
                                 description="pieces of a split document shorter than this are dropped")
    max_splits: int = Field(10, ge=0, description="a document split more often than this is dropped whole")


HIT_SCHEMA = pa.schema([("item", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
                        ("file", pa.string()), ("line", pa.int64()), ("ngram", pa.string())])
TASK_COLUMNS = ["task", "items", "judged", "too_short", "contaminated", "share", "share_lo", "share_hi",
                "median_question_words", "median_question_span", "answer_found", "documents"]


# ---- which items, which n-grams -----------------------------------------------------------------------
def task_specs(pipeline_cfg) -> list:
    """`trace.tasks`, or the memorization stage's tasks when none are given."""
    return list(pipeline_cfg.trace.tasks if pipeline_cfg.trace.tasks is not None
                else pipeline_cfg.memorization.tasks)


def item_ngrams(item: dict, n: int, min_words: int, rule: str = "question_answer") -> list[str]:
    """The item's word n-grams (rule `question_answer`: question then answer; `question`: the question alone,
    as NeMo Curator); the whole item when it is shorter than n; none when it is shorter than `min_words`."""
    w = match_words(item["input"]) + (match_words(item["output"]) if rule == "question_answer" else [])
    return word_ngrams(w, n) if len(w) >= min_words else []


def gram_index(items: list[dict], n: int, min_words: int,
               rule: str = "question_answer") -> dict[int, dict[str, list[str]]]:
    """n-gram size -> n-gram -> item keys (several items may share one)."""
    index: dict[int, dict[str, list[str]]] = {}
    for item in items:
        for gram in item_ngrams(item, n, min_words, rule):
            index.setdefault(gram.count(" ") + 1, {}).setdefault(gram, []).append(item["key"])
    return index


def frequent_filter(hits: list[dict], max_matches: int | None) -> tuple[list[dict], dict[str, int]]:
    """Hits without the n-grams found in more than `max_matches` documents (NeMo Curator's cap: such an n-gram
    is boilerplate, not a leak), and those n-grams with their document counts."""
    if max_matches is None:
        return hits, {}
    docs: dict[str, set] = {}
    for h in hits:
        docs.setdefault(h["ngram"], set()).add(h["doc_id"])
    ignored = {g: len(d) for g, d in docs.items() if len(d) > max_matches}
    return [h for h in hits if h["ngram"] not in ignored], ignored


def remove_spans(text: str, grams: list[str], margin: int, min_chars: int,
                 max_splits: int) -> list[str] | None:
    """The document's pieces after cutting every occurrence of `grams` (word n-grams as `match_words` makes
    them) plus `margin` characters each side (GPT-3 / NeMo Curator); pieces under `min_chars` are dropped;
    None when it would split more than `max_splits` times (the whole document goes)."""
    found = match_spans(text)
    tokens = [w for _, _, w in found]
    cuts = []
    for gram in grams:
        g = gram.split(" ")
        for i in range(len(tokens) - len(g) + 1):
            if tokens[i:i + len(g)] == g:
                cuts.append((max(0, found[i][0] - margin), min(len(text), found[i + len(g) - 1][1] + margin)))
    merged: list[list[int]] = []
    for start, end in sorted(cuts):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if len(merged) > max_splits:
        return None
    bounds = [0] + [x for cut in merged for x in cut] + [len(text)]
    pieces = [text[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]
    return [p for p in pieces if len(p) >= min_chars]


# ---- the corpus scan (one Dask task per documents shard) ------------------------------------------------
def document_hits(text: str, grams: dict[int, dict[str, list[str]]], firsts: dict[int, set[str]]):
    """(item key, n-gram) for every item n-gram in the document; a first-word filter skips most positions."""
    w, found = match_words(text), {}
    for size, table in grams.items():
        for i in range(len(w) - size + 1):
            if w[i] in firsts[size]:
                gram = " ".join(w[i:i + size])
                for key in table.get(gram, ()):
                    found.setdefault(key, gram)
    return found.items()


def scan_shard(store_uri: str, ref: str, shard: int, documents_ref: str, grams: dict, owners: dict) -> dict:
    store = ArtifactStore(store_uri)
    firsts = {size: {g.split(" ", 1)[0] for g in table} for size, table in grams.items()}
    table = store.read_shard(documents_ref, shard, columns=["id", "file", "line", "text"])
    rows = []
    for doc in table.to_pylist():
        for key, gram in document_hits(doc["text"], grams, firsts):
            rows.append({"item": owners[key]["id"], "task": owners[key]["task"], "doc_id": doc["id"],
                         "file": doc["file"], "line": doc["line"], "ngram": gram})
    return store.write_shard(ref, shard, pa.Table.from_pylist(rows, schema=HIT_SCHEMA),
                             records=table.num_rows)


def decontaminate_shard(store_uri: str, ref: str, shard: int, documents_ref: str,
                        matches: dict[str, list[str]], cfg: TraceConfig) -> dict:
    """The shard without contamination: mode `drop_document` drops every matching document; `remove_span`
    cuts the matched n-grams with `remove_margin` characters each side and keeps the pieces as documents
    `<id>-<k>` (a document split more than `max_splits` times, or with nothing left, is dropped)."""
    store = ArtifactStore(store_uri)
    table, rows, dropped, split = store.read_shard(documents_ref, shard), [], 0, 0
    for doc in table.to_pylist():
        if doc["id"] not in matches:
            rows.append(doc)
            continue
        pieces = (None if cfg.decontaminate_mode == "drop_document" else
                  remove_spans(doc["text"], matches[doc["id"]], cfg.remove_margin, cfg.min_piece_chars,
                               cfg.max_splits))
        dropped += not pieces
        split += bool(pieces)
        rows += [{**doc, "id": f"{doc['id']}-{k}", "text": piece} for k, piece in enumerate(pieces or [])]
    kept = pa.Table.from_pylist(rows, schema=table.schema)
    return store.write_shard(ref, shard, kept, records=kept.num_rows, dropped=dropped, split=split)


# ---- longest spans (infini-gram) -------------------------------------------------------------------------
def longest_span(engine, ids: list[int]) -> tuple[int, int]:
    """(start, end) of the longest run of `ids` that occurs in the corpus (two pointers: occurrence is
    closed under sub-spans, so the end never moves back)."""
    best, end = (0, 0), 0
    for start in range(len(ids)):
        end = max(end, start)
        while end < len(ids) and engine.count(ids[start:end + 1])["count"] > 0:
            end += 1
        if end - start > best[1] - best[0]:
            best = (start, end)
    return best


def longest_form_span(engine, tok, text: str) -> list[int]:
    """The longest run of the text's tokens that the corpus holds, over both tokenizations (mid-text with a
    leading space, bare at a document start): the spaced form alone missed a question that opens a
    document."""
    from tracecore.tasks.index_query import forms

    best: list[int] = []
    for ids in forms(tok, text.strip()):
        start, end = longest_span(engine, ids)
        best = ids[start:end] if end - start > len(best) else best
    return best


def span_ranks(engine, tok, span: list[int], limit: int) -> tuple[int, list[tuple]]:
    """(count, ranks) of a span's text in every tokenization, as `tracecore ngram count` counts a phrase."""
    from tracecore.tasks.index_query import forms, phrase_ranks

    count, ranks = 0, []
    for ids in forms(tok, tok.decode(span).strip()):
        n, found = phrase_ranks(engine, ids, limit - len(ranks))
        count, ranks = count + n, ranks + found
    return count, ranks


def trace_spans(store: ArtifactStore, index_ref: str, items: list[dict], max_docs: int) -> list[dict]:
    """Per item: the longest question span and answer span, their counts and documents."""
    from tracecore.tasks.index_query import docs_by_ranks, document_rows, opened, raw_engine

    out = []
    with opened(store, index_ref) as (engine, tok):
        raw, _ = raw_engine(engine)
        pending: list[tuple[dict, str, list[tuple]]] = []
        for item in items:
            row = {"key": item["key"]}
            for field, text in (("question", item["input"]), ("answer", item["output"])):
                ids = tok.encode(" " + text.strip(), add_special_tokens=False).ids
                span = longest_form_span(engine, tok, text)
                count, ranks = span_ranks(engine, tok, span, 4 * max_docs) if span else (0, [])
                row |= {f"{field}_span": tok.decode(span).strip(), f"{field}_span_tokens": len(span),
                        f"{field}_tokens": len(ids), f"{field}_span_words": len(words(tok.decode(span))),
                        f"{field}_span_count": int(count)}
                pending.append((row, field, ranks))
            out.append(row)
        hits = docs_by_ranks(raw, [r for _, _, ranks in pending for r in ranks])
        offset, per_row = 0, []
        for row, field, ranks in pending:
            per_row.append((row, field,
                            list(dict.fromkeys(h["doc_ix"] for h in hits[offset:offset + len(ranks)]))))
            offset += len(ranks)
    located = document_rows(store, index_ref, sorted({ix for _, _, ixs in per_row for ix in ixs}))
    for row, field, ixs in per_row:
        row[f"{field}_docs"] = [{k: located[ix][k] for k in ("id", "file", "line")} for ix in ixs[:max_docs]]
    return out


# ---- summaries --------------------------------------------------------------------------------------------
def task_table(items: list[dict], max_docs: int) -> list[dict]:
    out = []
    for task in dict.fromkeys(i["task"] for i in items):
        group = [i for i in items if i["task"] == task]
        judged = [i for i in group if i["judged"]]
        bad = [i for i in judged if i["contaminated"]]
        lo, hi = wilson(len(bad), len(judged))
        spans = sorted(i["question_span_words"] for i in group)
        docs = list(dict.fromkeys(d["doc_id"] for i in bad for d in i["contaminating_docs"]))
        out.append({"task": task, "items": len(group), "judged": len(judged),
                    "too_short": len(group) - len(judged),
                    "contaminated": len(bad), "share": len(bad) / len(judged) if judged else None,
                    "share_lo": lo, "share_hi": hi,
                    "median_question_words": sorted(len(words(i["input"])) for i in group)[len(group) // 2],
                    "median_question_span": spans[len(spans) // 2] if spans else 0,
                    "answer_found": sum(i["answer_span"] == i["output"].strip()
                                        for i in group) / max(len(group), 1),
                    "documents": ", ".join(docs[:max_docs])
                        + (f" (+{len(docs) - max_docs})" if len(docs) > max_docs
                                                                   else "")})
    return out


def trace_png(items: list[dict], tasks: list[dict]) -> bytes:
    """Left: share contaminated per task with its interval; right: longest question span, as a share of the
    question's words, per task (how much of each question the corpus holds verbatim)."""
    fig, (left, right) = subplots(nrows=1, ncols=2, figsize=(8, 3))
    names = [t["task"] for t in tasks]
    shares = [t["share"] or 0.0 for t in tasks]
    err = [[s - t["share_lo"] for s, t in zip(shares, tasks)],
           [t["share_hi"] - s for s, t in zip(shares, tasks)]]
    left.bar(names, shares, yerr=err, capsize=4, color="tab:red")
    left.set(ylim=(0, 1), ylabel="share contaminated", title="contaminated items (95% Wilson)")
    for name in names:
        ratios = [i["question_span_words"] / max(len(words(i["input"])), 1) for i in items
                  if i["task"] == name]
        right.hist(ratios, bins=10, range=(0, 1), alpha=0.5, label=name)
    right.set(xlabel="longest question span / question words", ylabel="items", title="longest span in corpus")
    right.legend(fontsize=7)
    return figure_png(fig)


# ---- the stage -------------------------------------------------------------------------------------------
def trace_needs(pipeline_cfg) -> dict[str, str]:
    needs = {"index": "ngram.index", "documents": "ingest.documents"}
    return needs | ({"sample": "sample.sample"} if any(not s.path for s in task_specs(pipeline_cfg)) else {})


def trace_inputs(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """User task files by identity; the task list itself is in the args (it may come from memorization)."""
    from tracecore.storage.fs import input_fingerprint, list_input_files

    specs = task_specs(pipeline_cfg)
    inputs = {f"task_{s.name}": input_fingerprint(list_input_files([s.path], f"trace.tasks.{s.name}.path"))
              for s in specs if s.path}
    inputs["tasks"] = ",".join(f"{s.name}:{s.kind}:{s.path or 'sample'}" for s in specs)
    return inputs, {"tasks": [s.model_dump() for s in specs]}


def decontaminated_output(cfg: TraceConfig, inputs: dict[str, str], code: str) -> dict[str, Planned]:
    if not cfg.decontaminate:
        return {}
    return {"documents_decontaminated": plan_artifact("trace", "documents_decontaminated", cfg.fingerprint(),
                                                      inputs, code)}


def load_items(run: StageRun) -> tuple[list[dict], list[dict]]:
    items, rejects = [], []
    for spec in map(TaskSpec.model_validate, run.args["tasks"]):
        path = spec.path or f"{run.store.files_path(run.inputs['sample'])}/tasks/{spec.kind}.jsonl"
        got, bad = load_task(spec, path, run.cfg.max_items, stage="trace")
        items, rejects = items + [{**i, "key": f"{spec.name}/{i['id']}"} for i in got], rejects + bad
    return items, rejects


def run_trace(run: StageRun) -> None:
    store, cfg, log, refs = run.store, run.cfg, run.log, run.plan.refs
    items, rejects = load_items(run)
    if not store.is_committed(refs["rejects"]):
        run.write("rejects", pa.Table.from_pylist(
            rejects,
            schema=pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])),
            {"rejected": len(rejects)})
    if rejects:
        log.info("trace: %d task rows rejected (first: %s line %d: %s); see %s", len(rejects),
                 rejects[0]["file"], rejects[0]["line"], rejects[0]["reason"], refs["rejects"])
    grams = gram_index(items, cfg.contamination_n, cfg.min_words, cfg.rule)
    documents_ref, by_key = run.inputs["documents"], {i["key"]: i for i in items}
    n_shards = store.manifest(documents_ref)["shards"]
    report = run.map("hits", scan_shard, [documents_ref] * n_shards, grams=grams,
                     owners={k: {"id": i["id"], "task": i["task"]} for k, i in by_key.items()})
    if not store.is_committed(refs["hits"]):
        run.commit("hits", {"seconds": report.seconds, "skipped_shards": report.skipped},
                   expected_shards=n_shards)
    hits, frequent = frequent_filter(store.read_table(refs["hits"]).to_pylist(), cfg.max_matches)
    if frequent:
        log.info("trace: %d n-grams found in more than trace.max_matches=%d documents ignored (e.g. %r)",
                 len(frequent), cfg.max_matches, next(iter(frequent)))
    spans = {r["key"]: r for r in trace_spans(store, run.inputs["index"], items, cfg.max_docs)}
    by_item: dict[tuple, list[dict]] = {}
    for h in hits:
        by_item.setdefault((h["task"], h["item"]), []).append(h)
    rows = [item_row(i, spans[i["key"]], by_item.get((i["task"], i["id"]), []), cfg) for i in items]
    log_dropped("trace", "items", len(rows), {f"shorter than trace.min_words={cfg.min_words}, not judged for "
                                              "contamination": sum(not r["judged"] for r in rows)})
    tasks = task_table(rows, cfg.max_docs)
    if not store.is_committed(refs["tasks"]):
        store.write_file(refs["tasks"], "plots/trace_contamination.png", trace_png(rows, tasks))
        run.write("tasks", pa.Table.from_pylist(tasks), {
            "report_columns": TASK_COLUMNS, "plots": ["plots/trace_contamination.png"],
            "contamination_n": cfg.contamination_n, "rule": cfg.rule,
            "ngrams_over_max_matches": len(frequent)})
    if cfg.decontaminate and not store.is_committed(refs["documents_decontaminated"]):
        matches: dict[str, list[str]] = {}
        for h in hits:
            matches.setdefault(h["doc_id"], []).append(h["ngram"])
        decontaminate(run, matches)
    run.write("items", pa.Table.from_pylist(rows),
              {"items": len(rows), "contaminated": sum(r["contaminated"] for r in rows)})
    for t in tasks:
        log.info("trace %s: %d/%d judged items contaminated (%d-word n-grams), median longest question span "
                 "%d words",
                 t["task"], t["contaminated"], t["judged"], cfg.contamination_n, t["median_question_span"])


def item_row(item: dict, spans: dict, own: list[dict], cfg: TraceConfig) -> dict:
    """One item's row: its spans, whether it could be judged, the documents it shares an n-gram with."""
    docs = list({h["doc_id"]: {"doc_id": h["doc_id"], "file": h["file"], "line": h["line"],
                               "ngram": h["ngram"]}
                 for h in own}.values())
    judged = bool(item_ngrams(item, cfg.contamination_n, cfg.min_words, cfg.rule))
    return {"task": item["task"], "id": item["id"], "input": item["input"], "output": item["output"],
            **{k: v for k, v in spans.items() if k != "key"}, "judged": judged, "contaminated": bool(docs),
            "contaminating_docs": docs[: cfg.max_docs], "contaminating_count": len(docs)}


def decontaminate(run: StageRun, matches: dict[str, list[str]]) -> None:
    """The documents without contamination (same shards, same schema), by `trace.decontaminate_mode`."""
    documents_ref, ref = run.inputs["documents"], run.plan.refs["documents_decontaminated"]
    n_shards = run.store.manifest(documents_ref)["shards"]
    report = run.map("documents_decontaminated", decontaminate_shard, [documents_ref] * n_shards,
                     matches=matches, cfg=run.cfg)
    dropped, split = (sum(m.get(k, 0) for m in report.markers) for k in ("dropped", "split"))
    run.commit("documents_decontaminated", {"mode": run.cfg.decontaminate_mode, "dropped_documents": dropped,
                                            "split_documents": split}, expected_shards=n_shards)
    run.log.info("trace: %d contaminating documents dropped, %d split (%s) in %s", dropped, split,
                 run.cfg.decontaminate_mode, ref)


STAGE = Stage("trace", TraceConfig, {"items": "trace_items", "tasks": "trace_tasks", "hits": "trace_hits",
                                     "rejects": "trace_rejects"},
              run_trace, needs=trace_needs, external=trace_inputs, subartifacts=decontaminated_output,
              description="longest spans of task items in the corpus, with documents; n-gram contamination")
