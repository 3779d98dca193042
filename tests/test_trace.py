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
    from tracecore.tasks.registry import load_config

    cfg = load_config(str(TEST_PROFILE), [f"sample.planted_contamination={PLANTED}", "trace.decontaminate=true", "trace.max_items=0"],
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
    assert len(planted) == PLANTED and not {p["id"] for p in planted} <= in_corpus - {p["id"] for p in planted}
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
    from tracecore.tasks.registry import load_config

    folder = traced.store.artifact_dir(traced.refs["trace.documents_decontaminated"])
    cfg = load_config(str(TEST_PROFILE), [f"ingest.paths=[{folder}/*.parquet]"],
                      store=str(tmp_path / "store"))
    refs = run_stages(cfg, ["ingest"])
    again = ArtifactStore(cfg.store).read_table(refs["ingest.documents"]).column("id").to_pylist()
    kept = traced.store.read_table(traced.refs["trace.documents_decontaminated"]).column("id").to_pylist()
    assert sorted(again) == sorted(kept) and not {p["doc_id"] for p in traced.planted} & set(again)
