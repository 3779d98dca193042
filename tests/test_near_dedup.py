"""Near-duplicate removal in ingest (MinHash-LSH, verified by true Jaccard): planted near-copies are found
and clustered with their source, nothing below the threshold is clustered, and the clusters equal a
brute-force all-pairs scan on a small corpus."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
from tracecore.flows.plan import plan_pipeline
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.near_dedup import band_keys, clusters, group_pairs, shingles
from tracecore.tasks.runtime.registry import validate_config
from tracecore.tasks.text import jaccard

VOCAB = [f"w{i}" for i in range(400)]


def edited(words: list[str], edits: int, rng: random.Random) -> list[str]:
    """`edits` word substitutions at random places (a near-copy: templated or lightly rewritten page)."""
    out = list(words)
    for i in rng.sample(range(len(out)), edits):
        out[i] = rng.choice(VOCAB)
    return out


def planted_corpus(folder) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Three files: 60 random documents, near-copies of 12 of them at 1-2 substitutions (Jaccard >= 0.9)
    placed later, and 8 looser copies at 5-7 substitutions (0.55-0.75). Returns (files, near-copy ->
    source, loose copy -> source)."""
    rng = random.Random(3)
    base = {f"doc-{i:03d}": [rng.choice(VOCAB) for _ in range(120)] for i in range(60)}
    near = {f"near-{i:03d}": (f"doc-{i:03d}", edited(base[f"doc-{i:03d}"], 1 + i % 2, rng))
            for i in range(12)}
    loose = {f"loose-{i:03d}": (f"doc-{i:03d}", edited(base[f"doc-{i:03d}"], 5 + i % 3, rng))
             for i in range(20, 28)}
    rows = [(k, " ".join(v)) for k, v in base.items()] + [(k, " ".join(v)) for k, (_, v) in near.items()] + \
           [(k, " ".join(v)) for k, (_, v) in loose.items()]
    files = []
    for f in range(3):
        path = folder / f"part-{f}.jsonl"
        path.write_text("".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in rows[f::3]))
        files.append(str(path))
    return files, {k: s for k, (s, _) in near.items()}, {k: s for k, (s, _) in loose.items()}


def run_ingest(tmp_path, files, **near):
    from tracecore.flows.pipeline import run_stages

    cfg = validate_config({"store": str(tmp_path / "store"), "calibrate": False,
                           "ingest": {"paths": files, "near_dedup": {"enabled": True, **near}}})
    refs = plan_pipeline(cfg, ArtifactStore(cfg.store), ["ingest"])["ingest"].refs
    run_stages(cfg, ["ingest"])
    return ArtifactStore(cfg.store), refs


def brute_force_clusters(texts: dict[str, str], order: list[str], threshold: float) -> dict[str, str]:
    """member -> kept id over every pair's true Jaccard (the reference the LSH path must equal)."""
    sets = {k: shingles(t, "words", 5) for k, t in texts.items()}
    edges = [((order.index(a),), (order.index(b),), jaccard(sets[a], sets[b]))
             for a, b in itertools.combinations(order, 2)]
    found = clusters(e for e in edges if e[2] >= threshold)
    return {order[m[0]]: order[kept[0]] for m, (kept, _) in found.items()}


def test_planted_near_duplicates_are_removed_and_match_a_brute_force_scan(tmp_path):
    (tmp_path / "in").mkdir()
    files, near, loose = planted_corpus(tmp_path / "in")
    store, refs = run_ingest(tmp_path, files)
    removed = store.read_table(refs["near_duplicates"]).to_pylist()
    assert {r["id"]: r["cluster"] for r in removed} == near  # every planted copy with its source, no other
    kept = store.read_table(refs["documents"]).column("id").to_pylist()
    assert not set(near) & set(kept) and set(loose) <= set(kept)  # loose copies (< 0.8) are not clustered
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for f in files for line in open(f)}
    order = [json.loads(line)["id"] for line in itertools.chain(*(open(f) for f in files))]
    assert brute_force_clusters(texts, order, 0.8) == near
    for r in removed:  # the similarity is the pair's true Jaccard, and the row keeps the whole document
        assert r["similarity"] == round(jaccard(shingles(r["text"], "words", 5),
                                                shingles(texts[r["cluster"]], "words", 5)), 6) >= 0.8
        assert r["text"] == texts[r["id"]] and r["file"].endswith(".jsonl") and r["line"] >= 1
    manifest = store.manifest(refs["documents"])
    assert manifest["near_duplicates"] == len(near) and manifest["near_duplicate_clusters"] == len(near)


def test_a_lower_threshold_clusters_the_loose_copies_too(tmp_path):
    """The threshold decides (the check above can fail): at 0.5 the 5-7-substitution copies join."""
    (tmp_path / "in").mkdir()
    files, near, loose = planted_corpus(tmp_path / "in")
    store, refs = run_ingest(tmp_path, files, threshold=0.5)
    removed = {r["id"]: r["cluster"] for r in store.read_table(refs["near_duplicates"]).to_pylist()}
    assert len(removed) == len(near) + len(loose)
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for f in files for line in open(f)}
    order = [json.loads(line)["id"] for line in itertools.chain(*(open(f) for f in files))]
    assert removed == brute_force_clusters(texts, order, 0.5)  # a loose copy in an earlier file is kept


def test_near_dedup_runs_for_the_sample_world_and_not_for_a_user_corpus_unless_enabled(tmp_path):
    sample = validate_config({"store": str(tmp_path / "s"), "calibrate": False})
    user = validate_config({"store": str(tmp_path / "u"), "calibrate": False, "ingest": {"paths": ["x"]}})
    assert "near_duplicates" in plan_pipeline(sample, ArtifactStore(sample.store), ["ingest"])["ingest"].refs
    assert "near_duplicates" not in near_outputs(user)
    enabled = validate_config({"store": str(tmp_path / "e"), "calibrate": False,
                               "ingest": {"paths": ["x"], "near_dedup": {"enabled": True}}})
    assert "near_duplicates" in near_outputs(enabled)


def near_outputs(cfg) -> dict:
    from tracecore.tasks.ingest import near_dedup_outputs

    return near_dedup_outputs(cfg.ingest, {"files": "fingerprint"}, "code")


def test_clusters_keep_the_first_document_and_chain_through_edges():
    edges = [((0, 5), (1, 2), 0.9), ((1, 2), (0, 9), 0.85), ((2, 0), (2, 1), 0.95)]
    assert clusters(edges) == {(1, 2): ((0, 5), 0.9), (0, 9): ((0, 5), 0.85), (2, 1): ((2, 0), 0.95)}


def test_a_large_lsh_bucket_pairs_linearly_and_equal_bands_give_equal_keys():
    members = [(0, r) for r in range(100)]
    assert len(list(group_pairs(members, 64))) == 99 + 98
    assert len(list(group_pairs(members[:10], 64))) == 45
    sig = np.arange(64, dtype=np.uint64).reshape(2, 32)
    sig[1, :8] = sig[0, :8]  # band 0 (rows 0-7) equal, the rest different
    keys = band_keys(sig, 4, 8)
    assert keys[0, 0] == keys[1, 0] and not (keys[0, 1:] == keys[1, 1:]).any()


def test_the_sample_worlds_planted_near_duplicates_are_removed_and_nothing_else(tmp_path):
    """Recall 1 and no false cluster on the sample world's ground truth: every near-copy at Jaccard >= 0.8
    is removed with its source as cluster, a copy below it stays, and every original document stays."""
    import gzip

    import pyarrow.parquet as pq
    from tracecore.flows.pipeline import run_stages

    small = {"n_entities": 30, "max_fact_frequency": 40, "n_parallel_phrases": 15, "filler_documents": 300,
             "instructions": 160, "preference_pairs": 20, "haystacks": 5, "haystack_sentences": 20,
             "corpus_files": 3, "near_duplicate_documents": 90, "planted_contamination": 5}
    cfg = validate_config({"store": str(tmp_path / "store"), "calibrate": False, "sample": small})
    plan = plan_pipeline(cfg, ArtifactStore(cfg.store), ["sample", "ingest"])
    run_stages(cfg, ["sample", "ingest"])
    store, refs = ArtifactStore(cfg.store), plan["ingest"].refs
    world = store.files_path(plan["sample"].refs["sample"])
    truth = pq.read_table(f"{world}/ground_truth/near_duplicates.parquet").to_pylist()
    assert {t["kind"] for t in truth} == {"word_changed", "boilerplate", "reformatted"}
    removed = {r["id"]: r["cluster"] for r in store.read_table(refs["near_duplicates"]).to_pylist()}
    assert removed == {t["id"]: t["source_id"] for t in truth if t["jaccard"] >= 0.8}
    originals = [json.loads(line)["id"] for k in range(3)
                 for line in gzip.open(f"{world}/corpus/part-{k:03d}.jsonl.gz")]
    kept = store.read_table(refs["documents"]).column("id").to_pylist()
    assert kept == originals + [t["id"] for t in truth if t["jaccard"] < 0.8]
    from tracecore.flows.readme import near_duplicate_counts, render_near_duplicates

    record = {"run_id": "r", "stages": {"ingest": {"refs": refs}, "sample": {"refs": plan["sample"].refs}}}
    counts = near_duplicate_counts(store, record)
    assert counts["planted"] == counts["recall"] == len(removed) and counts["false"] == 0
    assert f"| {counts['read']} | {len(removed)} |" in render_near_duplicates(store, record)


def test_pair_chunks_are_runs_of_one_partner_shard_covering_every_pair_once():
    from tracecore.tasks.near_dedup import pair_chunks

    pairs = [(0, r, s, r + s) for r in range(7) for s in (0, 2, 1)]
    chunks = list(pair_chunks(pairs, 3))
    assert all(len(c) <= 3 and len({p[2] for p in c}) == 1 for c in chunks)
    assert sorted(p for c in chunks for p in c) == sorted(pairs)
    assert [c[0][2] for c in chunks] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # a partner shard is read once


def test_verification_holds_one_run_of_pairs_at_a_time_and_gives_the_same_edges(tmp_path, monkeypatch):
    """Memory per verification task is flat: however many candidates a shard has, no step builds shingle
    sets for more than `verify_pairs` pairs' documents, and the edges equal the unchunked pass's."""
    from tracecore.tasks import near_dedup as nd

    (tmp_path / "in").mkdir()
    files, near, _ = planted_corpus(tmp_path / "in")
    from tracecore.flows.pipeline import run_stages

    cfg = validate_config({"store": str(tmp_path / "store"), "calibrate": False, "ingest": {
        "paths": files, "keep_intermediates": True, "near_dedup": {"enabled": True, "threshold": 0.5}}})
    refs = plan_pipeline(cfg, ArtifactStore(cfg.store), ["ingest"])["ingest"].refs
    run_stages(cfg, ["ingest"])
    store = ArtifactStore(cfg.store)
    candidates = store.read_table(refs["near_candidates"]).to_pylist()
    shard = max({c["shard_a"] for c in candidates}, key=lambda s: sum(c["shard_a"] == s for c in candidates))
    pairs = sorted((c["shard_a"], c["row_a"], c["shard_b"], c["row_b"]) for c in candidates
                   if c["shard_a"] == shard)
    assert len(pairs) > 3
    sizes, documents = [], nd._documents
    monkeypatch.setattr(nd, "_documents", lambda table, rows, params: sizes.append(len(rows)) or
                        documents(table, rows, params))
    params = {"shingle": "words", "shingle_size": 5, "verify_pairs": 3}
    nd.verify_shard(cfg.store, "check/near_pairs", shard, (refs["parsed"], pairs), params)
    assert sizes and max(sizes) <= 3
    expected = [e for e in store.read_table(refs["near_pairs"]).to_pylist() if e["shard_a"] == shard]
    key = lambda e: (e["row_a"], e["shard_b"], e["row_b"])  # noqa: E731
    found = store.read_shard("check/near_pairs", shard).to_pylist()
    assert sorted(found, key=key) == sorted(expected, key=key)
