"""Stage `trace`: longest spans with their documents, and n-gram contamination, on a sample world with
planted contamination (QA items copied verbatim into the corpus; `ground_truth/planted.jsonl` lists them)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from tracecore.storage.store import ArtifactStore

PLANTED = 6


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    from conftest import TEST_PROFILE
    from tracecore.flows.pipeline import run_stages
    from tracecore.tasks.runtime.registry import load_config

    cfg = load_config(str(TEST_PROFILE), [f"sample.planted_contamination={PLANTED}",
                                          "trace.decontaminate=true", "trace.max_items=0"],
                      store=str(tmp_path_factory.mktemp("trace") / "store"))
    refs = run_stages(cfg, ["trace"])
    store = ArtifactStore(cfg.store)
    truth = store.files_path(refs["sample.sample"]) + "/ground_truth"
    planted = [json.loads(line) for line in store.fs.open(f"{truth}/planted.jsonl", "rt")]
    # the sample world also states some facts in FAQ style ("Where was X born? Y."): QA items in the corpus
    with store.fs.open(f"{truth}/facts.parquet", "rb") as fh:
        facts = pq.read_table(fh).to_pylist()
    in_corpus = {f"qa-{i:05d}" for i, f in enumerate(facts) if f["qa_shaped"]} | {p["id"] for p in planted}
    return SimpleNamespace(cfg=cfg, store=store, refs=refs, planted=planted, in_corpus=in_corpus)


def test_every_planted_item_is_found_and_no_other(traced):
    t = traced
    cfg, store, refs, planted, in_corpus = t.cfg, t.store, t.refs, t.planted, t.in_corpus
    items = store.read_table(refs["trace.items"]).to_pylist()
    assert len(planted) == PLANTED and not {p["id"]
                                            for p in planted} <= in_corpus - {p["id"] for p in planted}
    flagged = {(r["task"], r["id"]) for r in items if r["contaminated"]}
    traced_qa = {r["id"] for r in items if r["task"] == "qa"}
    assert flagged == {("qa", i) for i in in_corpus & traced_qa}  # planted + FAQ-style facts; nothing else
    assert {p["id"] for p in planted} <= traced_qa
    by_id = {(r["task"], r["id"]): r for r in items}
    for p in planted:
        row = by_id[("qa", p["id"])]
        assert p["doc_id"] in [d["doc_id"] for d in row["contaminating_docs"]]
        assert row["question_span"] == row["input"].strip()  # the whole question occurs (in the planted doc)
        assert row["question_span_count"] >= 1 and row["question_docs"]
    unjudged = [r for r in items if not r["judged"]]
    assert all(len((r["input"] + " " + r["output"]).split()) < cfg.trace.min_words for r in unjudged)


def test_span_documents_point_at_the_ingested_rows(traced):
    store, refs = traced.store, traced.refs
    documents = {r["id"]: r for r in store.read_table(refs["ingest.documents"]).to_pylist()}
    items = store.read_table(refs["trace.items"]).to_pylist()
    checked = 0
    for r in items:
        for field in ("question", "answer"):
            for d in r[f"{field}_docs"]:
                doc = documents[d["id"]]
                assert (doc["file"], doc["line"]) == (d["file"], d["line"])
                assert r[f"{field}_span"] in doc["text"]
                checked += 1
    assert checked > len(items)


def test_task_table_intervals_and_decontaminated_documents(traced):
    store, refs, planted, in_corpus = traced.store, traced.refs, traced.planted, traced.in_corpus
    tasks = {r["task"]: r for r in store.read_table(refs["trace.tasks"]).to_pylist()}
    qa = tasks["qa"]
    assert qa["contaminated"] == len(in_corpus & {f"qa-{i:05d}" for i in range(qa["items"])})
    assert qa["share"] == pytest.approx(qa["contaminated"] / qa["judged"])
    assert 0.0 <= qa["share_lo"] <= qa["share"] <= qa["share_hi"] <= 1.0
    assert tasks["translation"]["contaminated"] == 0 and tasks["translation"]["share_lo"] == 0.0
    kept = set(store.read_table(refs["trace.documents_decontaminated"]).column("id").to_pylist())
    every = set(store.read_table(refs["ingest.documents"]).column("id").to_pylist())
    hits = store.read_table(refs["trace.hits"]).to_pylist()
    assert every - kept == {h["doc_id"] for h in hits} and {p["doc_id"] for p in planted} <= every - kept
    assert store.manifest(refs["trace.tasks"])["plots"] == ["plots/trace_contamination.png"]


def test_a_later_run_reads_the_decontaminated_documents(traced, tmp_path):
    from conftest import TEST_PROFILE
    from tracecore.flows.pipeline import run_stages
    from tracecore.tasks.runtime.registry import load_config

    folder = traced.store.artifact_dir(traced.refs["trace.documents_decontaminated"])
    cfg = load_config(str(TEST_PROFILE), [f"ingest.paths=[{folder}/*.parquet]"],
                      store=str(tmp_path / "store"))
    refs = run_stages(cfg, ["ingest"])
    again = ArtifactStore(cfg.store).read_table(refs["ingest.documents"]).column("id").to_pylist()
    kept = traced.store.read_table(traced.refs["trace.documents_decontaminated"]).column("id").to_pylist()
    assert sorted(again) == sorted(kept) and not {p["doc_id"] for p in traced.planted} & set(again)


# ---- the contamination rule on its own (no sample-world item reaches 13 words)
# ------------------------------
FIFTEEN = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"


def test_thirteen_gram_window_slides_over_a_long_item():
    from tracecore.tasks.trace import document_hits, gram_index, item_ngrams

    item = {"key": "t/1", "input": FIFTEEN, "output": "sixteen"}
    grams = item_ngrams(item, 13, 5, rule="question")
    assert len(grams) == 3 and grams[1] == " ".join(FIFTEEN.split()[1:14])
    index = gram_index([item], 13, 5, rule="question")
    firsts = {size: {g.split(" ", 1)[0] for g in table} for size, table in index.items()}
    middle = "Prefix text. " + " ".join(FIFTEEN.split()[1:14]).upper() + "!"  # case and punctuation ignored
    assert dict(document_hits(middle, index, firsts)) == {"t/1": grams[1]}
    twelve = " ".join(FIFTEEN.split()[1:13])
    assert not list(document_hits(twelve, index, firsts))


def test_rule_question_ignores_the_answer_and_question_answer_joins_it():
    from tracecore.tasks.trace import item_ngrams

    item = {"key": "t/2", "input": "what is the capital of zelania", "output": "paris"}
    assert item_ngrams(item, 13, 5, rule="question") == ["what is the capital of zelania"]
    assert item_ngrams(item, 13, 5, rule="question_answer") == ["what is the capital of zelania paris"]
    assert item_ngrams({**item, "input": "capital of zelania"}, 13, 5, rule="question") == []  # too short


def test_max_matches_ignores_ngrams_found_in_too_many_documents():
    """NeMo Curator's `max_matches`: an n-gram in more documents than the cap is boilerplate, not a leak."""
    from tracecore.tasks.trace import frequent_filter

    hits = [{"item": "a", "ngram": "common words", "doc_id": f"d{i}"} for i in range(5)]
    hits += [{"item": "b", "ngram": "rare leak", "doc_id": "d9"}]
    kept, ignored = frequent_filter(hits, 3)
    assert [h["item"] for h in kept] == ["b"] and ignored == {"common words": 5}
    assert frequent_filter(hits, None) == (hits, {})


def test_remove_span_cuts_the_match_with_a_margin_and_splits_the_document():
    """GPT-3 / NeMo decontamination: the matched n-gram plus `margin` characters each side is removed and the
    document split there; pieces shorter than `min_chars` go, and a document split too often is dropped."""
    from tracecore.tasks.trace import remove_spans

    before, after = "a" * 300 + " keep this start. ", " keep this end. " + "b" * 300
    text = before + "The Capital of Zelania is Paris" + after
    pieces = remove_spans(text, ["the capital of zelania is paris"], margin=10, min_chars=50, max_splits=10)
    assert len(pieces) == 2 and "Zelania" not in "".join(pieces)
    assert pieces[0] == text[:len(before) - 10] and pieces[1] == text[len(text) - len(after) + 10:]
    assert remove_spans(text, ["the capital of zelania is paris"], margin=400, min_chars=50,
                        max_splits=10) == []
    many = " x. ".join(["leak here"] * 12) + " " + "c" * 300
    assert remove_spans(many, ["leak here"], margin=0, min_chars=1, max_splits=10) is None
    assert remove_spans("at the start: " + "d" * 300, ["at the start"], 0, 10, 10) == [": " + "d" * 300]


def test_remove_span_mode_keeps_the_planted_documents_pieces_without_the_item(traced):
    """`decontaminate_mode: remove_span` over the traced store: every planted document loses its item's text
    (or goes whole), untouched documents stay byte for byte."""
    from tracecore.tasks.trace import decontaminate_shard

    store, refs = traced.store, traced.refs
    cfg = traced.cfg.trace.model_copy(update={"decontaminate_mode": "remove_span", "remove_margin": 20,
                                              "min_piece_chars": 1})
    hits = store.read_table(refs["trace.hits"]).to_pylist()
    matches: dict[str, list[str]] = {}
    for h in hits:
        matches.setdefault(h["doc_id"], []).append(h["ngram"])
    ref, docs_ref = "test/decontaminated_spans", refs["ingest.documents"]
    for shard in range(store.manifest(docs_ref)["shards"]):
        decontaminate_shard(store.root, ref, shard, docs_ref, matches, cfg)
    out = {r["id"]: r["text"] for s in range(store.manifest(docs_ref)["shards"])
           for r in store.read_shard(ref, s).to_pylist()}
    original = {r["id"]: r["text"] for r in store.read_table(docs_ref).to_pylist()}
    for doc_id, text in original.items():
        if doc_id not in matches:
            assert out[doc_id] == text
        else:
            assert doc_id not in out
            pieces = [t for i, t in out.items() if i.startswith(f"{doc_id}-")]
            assert all(len(p) < len(text) for p in pieces)
    question = {r["id"]: r["input"].strip().lower() for r in store.read_table(refs["trace.items"]).to_pylist()
                if r["task"] == "qa"}
    for p in traced.planted:
        assert not any(question[p["id"]] in t.lower() for i, t in out.items()
                       if i.startswith(f"{p['doc_id']}-")), p


class ListEngine:
    """An engine over a few token lists: `count` of a token sequence, as infini-gram answers it."""

    def __init__(self, docs: list[list[int]]):
        self.docs = docs

    def count(self, ids: list[int]) -> dict:
        n = len(ids)
        return {"count": sum(doc[i:i + n] == ids for doc in self.docs for i in range(len(doc) - n + 1))}


def test_a_question_that_opens_a_document_is_found_whole(traced):
    """At a document start a phrase is tokenized without its leading space; searching only the spaced form
    lost the first word (failed on the old code: the span missed 'Where')."""
    from tokenizers import Tokenizer
    from tracecore.tasks.trace import longest_form_span

    with traced.store.local_dir(traced.refs["tokenize.tokenizer"]) as folder:
        tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    question = "Where was Mivelo Darsk born?"
    engine = ListEngine([tok.encode(question + " In Tarn.", add_special_tokens=False).ids])
    assert tok.decode(longest_form_span(engine, tok, question)).strip() == question
    mid = ListEngine([tok.encode("We asked: " + question, add_special_tokens=False).ids])
    assert tok.decode(longest_form_span(mid, tok, question)).strip() == question
