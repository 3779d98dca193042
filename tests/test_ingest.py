"""Ingest: every malformed input becomes a rejects row (file, line, reason); no good record is lost."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tracecore.flows.pipeline import run_stages
from tracecore.flows.plan import plan_pipeline
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.ingest import (
    NoInputError,
    TooManyRejectsError,
    list_input_files,
)
from tracecore.tasks.runtime.registry import validate_config


def good(i: int) -> bytes:
    return json.dumps({"id": f"good-{i}", "text": f"document number {i} is fine", "source": "t"}).encode()


# (bad line, expected reason fragment)
BAD_LINES = [
    (b'{"id": "a", "text": "unterminated', "bad JSON"),
    (b"[1, 2, 3]", "JSON list, not an object"),
    (b'{"id": "b"}', "missing field 'text'"),
    (b'{"id": "c", "text": null}', "must be a string, got NoneType"),
    (b'{"id": "d", "text": 42}', "must be a string, got int"),
    (b'{"id": "e", "text": ""}', "is empty"),
    (b'{"id": "f", "text": "  \\n\\t "}', "is empty"),
    (b'{"id": "g", "text": "caf\xe9 au lait"}', "non-UTF-8 bytes"),
    (json.dumps({"id": "h", "text": "x" * 5000}).encode(),
     "oversize record: 5000 chars > max_doc_chars=1000"),
    (b'{"id": "i", "text": "nul\\u0000byte"}', "NUL characters"),
    (b'{"id": "j", "text": "half \\ud800 pair"}', "lone surrogate"),
    (b'{"id": [1], "text": "list id"}', "field 'id' must be a string or integer, got list"),
]


@pytest.fixture
def corpus(tmp_path):
    """A mixed-format corpus: returns (files dir, expected good ids, expected (file, line, reason)
    rejects)."""
    d = tmp_path / "in"
    d.mkdir()
    lines, expected, good_ids = [], [], []
    for k, (bad, reason) in enumerate(BAD_LINES):
        lines += [good(k), bad]
        good_ids.append(f"good-{k}")
        expected.append(("mixed.jsonl", 2 * k + 2, reason))
    (d / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")  # trailing blank line is not a reject
    (d / "ok.jsonl.zst").write_bytes(zstandard.compress(b"\n".join(good(i) for i in range(100, 103))))
    good_ids += ["good-100", "good-101", "good-102"]
    full = gzip.compress(b"\n".join(good(i) for i in range(200, 260)), mtime=0)
    (d / "truncated.jsonl.gz").write_bytes(full[: len(full) // 2])
    expected.append(("truncated.jsonl.gz", None, "unreadable stream"))
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["parquet one", "parquet two"]}), d / "good.parquet")
    good_ids += ["p1", "p2"]
    pq.write_table(pa.table({"id": ["q"], "content": ["no text column"]}), d / "notext.parquet")
    expected.append(("notext.parquet", 0, "no 'text' column"))
    (d / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    expected.append(("broken.parquet", 0, "unreadable Parquet file"))
    (d / "table.csv").write_text("id,text\n1,hello\n")
    expected.append(("table.csv", 0, "unsupported file type"))
    (d / "notes.txt").write_text("a plain text document\nwith two lines")
    good_ids.append("notes")
    (d / "latin1.txt").write_bytes("r\xe9sum\xe9".encode("latin-1"))
    expected.append(("latin1.txt", 1, "non-UTF-8 bytes"))
    return d, good_ids, expected


def ingest_config(store, files, **ingest):
    return validate_config({"store": str(store), "calibrate": False,
                            "ingest": {"paths": list(files), **ingest}})


def ingest_refs(cfg) -> dict[str, str]:
    """The ingest stage's planned refs by output name (known before it runs)."""
    return plan_pipeline(cfg, ArtifactStore(cfg.store), ["ingest"])["ingest"].refs


def ingest(tmp_path, files, **cfg_kwargs):
    cfg = ingest_config(tmp_path / "store", files,
                        **{"max_doc_chars": 1000, "max_reject_fraction": 1.0, **cfg_kwargs})
    refs = ingest_refs(cfg)
    run_stages(cfg, ["ingest"])
    return ArtifactStore(cfg.store), refs


def test_every_malformed_input_is_rejected_with_file_line_reason(tmp_path, corpus):
    d, good_ids, expected = corpus
    store, refs = ingest(tmp_path, list_input_files([str(d / "*")]))
    rejects = store.read_table(refs["rejects"]).to_pylist()
    assert len(rejects) == len(expected) >= 10
    for file, line, reason in expected:
        hits = [r for r in rejects if r["file"].endswith("/" + file) and reason in r["reason"]
                and (line is None or r["line"] == line)]
        assert hits, f"no reject for {file} line {line}: {reason}"
    docs = store.read_table(refs["documents"])
    ids = docs.column("id").to_pylist()
    assert set(good_ids) <= set(ids)
    # good lines before the corruption survive
    truncated = [i for i in ids if i.startswith("good-") and 200 <= int(i[5:]) < 300]
    assert truncated and truncated == [f"good-{i}" for i in range(200, 200 + len(truncated))]
    assert len(ids) == len(good_ids) + len(truncated)


def test_exact_duplicates_removed_first_occurrence_kept(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(json.dumps({"id": f"a{i}", "text": f"text {i % 3}"})
                                         for i in range(6)))
    (d / "b.jsonl").write_text(json.dumps({"id": "b0", "text": "text 1"}) + "\n"
                               + json.dumps({"id": "b1", "text": "new"}))
    store, refs = ingest(tmp_path, list_input_files([str(d / "*.jsonl")]))
    assert store.read_table(refs["documents"]).column("id").to_pylist() == ["a0", "a1", "a2", "b1"]
    assert store.manifest(refs["documents"])["duplicates"] == 4
    store2, refs2 = ingest(tmp_path / "nodedup", list_input_files([str(d / "*.jsonl")]), dedup=False)
    assert store2.manifest(refs2["documents"])["rows"] == 8


def test_too_many_rejects_fails_clearly_and_keeps_the_rejects(tmp_path, corpus):
    d, _, _ = corpus
    files = list_input_files([str(d / "mixed.jsonl")])
    with pytest.raises(TooManyRejectsError,
                       match=r"12 of 24 records rejected \(50.0%\) > ingest.max_reject_fraction"):
        ingest(tmp_path, files, max_reject_fraction=0.1)
    store = ArtifactStore(tmp_path / "store")
    refs = ingest_refs(ingest_config(tmp_path / "store", files, max_doc_chars=1000, max_reject_fraction=0.1))
    assert store.read_table(refs["rejects"]).num_rows == 12


def test_missing_inputs_name_the_pattern(tmp_path):
    with pytest.raises(NoInputError, match=r"ingest.paths: '.*nothing-\*.jsonl' matches no files"):
        list_input_files([str(tmp_path / "nothing-*.jsonl")])


def test_changed_input_changes_the_fingerprint(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "one"}))
    before = ingest_refs(ingest_config(tmp_path / "store", [str(f)]))
    f.write_text(json.dumps({"text": "one, edited"}))
    assert ingest_refs(ingest_config(tmp_path / "store", [str(f)])) != before


def test_memory_store_and_memory_inputs(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/inputs-t/a.jsonl", "wb") as fh:
        fh.write(b"\n".join(good(i) for i in range(5)))
    files = list_input_files(["memory://inputs-t/*.jsonl"])
    cfg = ingest_config("memory://store-t", files)
    refs = ingest_refs(cfg)
    run_stages(cfg, ["ingest"])
    assert ArtifactStore("memory://store-t").read_table(refs["documents"]).num_rows == 5


# ---- large inputs are split: memory per shard bounded by ingest.shard_mb
# -------------------------------------
@pytest.mark.parametrize("shard_bytes", [1, 7, 40, 41, 100, 10_000])
def test_line_splits_cover_the_file_on_line_boundaries_with_their_first_line(tmp_path, shard_bytes):
    from tracecore.tasks.splits import line_splits

    data = b"".join(b'{"i": %d}\n' % i if i % 7 else b"\n" for i in range(60)) + b'{"last": "no newline"}'
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    splits = line_splits(str(path), shard_bytes)
    assert [s["start"] for s in splits] == [0] + [s["end"]
                                                  for s in splits[:-1]] and splits[-1]["end"] == len(data)
    for s in splits:
        chunk = data[s["start"]:s["end"]]
        assert s["start"] == 0 or data[s["start"] - 1:s["start"]] == b"\n"
        assert s["first_line"] == data[:s["start"]].count(b"\n") + 1
        assert len(chunk) <= shard_bytes + max(len(line) + 1
                                               for line in data.split(b"\n")) or len(splits) == 1


def big_jsonl(path, n: int, bad_every: int) -> list[int]:
    """~n lines of ~150 bytes (> 1 MB for n >= 8,000); a malformed line every `bad_every`; their line
    numbers."""
    bad, lines = [], []
    for i in range(1, n + 1):
        if i % bad_every == 0:
            lines.append(b'{"id": "broken", "text": ')
            bad.append(i)
        else:
            lines.append(json.dumps({"id": f"d{i}", "text": f"document {i} " + "x" * 120}).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return bad


def test_one_large_jsonl_file_becomes_several_shards_with_the_same_documents_and_lines(tmp_path):
    path = tmp_path / "in" / "one.jsonl"
    path.parent.mkdir()
    bad = big_jsonl(path, 20_000, 997)
    assert path.stat().st_size > 2 << 20
    split_store, split_refs = ingest(tmp_path / "split", [str(path)], shard_mb=1)
    whole_store, whole_refs = ingest(tmp_path / "whole", [str(path)], shard_mb=64)
    assert split_store.manifest(split_refs["documents"])["shards"] >= 3
    assert whole_store.manifest(whole_refs["documents"])["shards"] == 1
    columns = ["id", "text", "line"]
    assert split_store.read_table(split_refs["documents"], columns=columns).equals(
        whole_store.read_table(whole_refs["documents"], columns=columns))  # same rows, same order, same lines
    rejects = split_store.read_table(split_refs["rejects"]).to_pylist()
    assert [r["line"] for r in rejects] == bad and all("bad JSON" in r["reason"] for r in rejects)


def test_a_parquet_file_is_split_by_row_groups_keeping_row_numbers(tmp_path):
    path = tmp_path / "in" / "big.parquet"
    path.parent.mkdir()
    n = 30_000
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"row {i} " + "y" * 100 for i in range(n)]})
    pq.write_table(table, path, row_group_size=2_000, compression="none")
    store, refs = ingest(tmp_path, [str(path)], shard_mb=1)
    assert store.manifest(refs["documents"])["shards"] >= 2
    docs = store.read_table(refs["documents"], columns=["id", "line"]).to_pylist()
    assert [d["id"] for d in docs] == table.column("id").to_pylist()
    assert [d["line"] for d in docs] == list(range(1, n + 1))


def test_dedup_is_partitioned_by_hash_and_equals_one_global_pass(tmp_path):
    """Documents repeated within and across files: the hash-partitioned dedup keeps exactly the first
    occurrences in (file, line) order, as one global set would, and no bucket task sees every hash."""
    d = tmp_path / "in"
    d.mkdir()
    texts = [[f"text {(7 * f + i) % 23}" for i in range(40)] for f in range(4)]  # 23 distinct texts, 160 rows
    for f, rows in enumerate(texts):
        (d / f"f{f}.jsonl").write_text("".join(json.dumps({"id": f"{f}-{i}", "text": t}) + "\n"
                                               for i, t in enumerate(rows)))
    files = sorted(str(p) for p in d.glob("*.jsonl"))
    seen, expected = set(), []
    for f, rows in enumerate(texts):
        for i, t in enumerate(rows):
            if t not in seen:
                expected.append(f"{f}-{i}")
            seen.add(t)
    for buckets in (1, 7):
        store, refs = ingest(tmp_path / f"b{buckets}", files, dedup_buckets=buckets, dedup_task_rows=10,
                             keep_intermediates=True)
        assert store.read_table(refs["documents"]).column("id").to_pylist() == expected
        assert store.manifest(refs["drops"])["shards"] == buckets  # 160 rows > 10 per task: a task per bucket
        # one hash file per parsed shard, its rows grouped by bucket (one read and checksum of a parsed shard,
        # not one per shard x bucket: 208 full-file checksums at 10^8 tokens, most of ingest's time)
        assert len(store.markers(refs["hashes"])) == len(store.markers(refs["parsed"])) == 4
        per_bucket = store.read_table(refs["hashes"]).column("bucket").to_numpy()
        per_bucket = [int((per_bucket == b).sum()) for b in range(buckets)]
        assert sum(per_bucket) == 160 and (buckets == 1 or max(per_bucket) < 160 / 2)


def repeated_texts_corpus(folder, files=4, rows=40):
    """`files` JSONL files of `rows` documents over 23 distinct texts; returns (paths, ids a global set
    keeps)."""
    folder.mkdir()
    seen, expected = set(), []
    for f in range(files):
        texts = [f"text {(7 * f + i) % 23}" for i in range(rows)]
        (folder / f"f{f}.jsonl").write_text("".join(json.dumps({"id": f"{f}-{i}", "text": t}) + "\n"
                                                    for i, t in enumerate(texts)))
        expected += [f"{f}-{i}" for i, t in enumerate(texts) if not (t in seen or seen.add(t))]
    return sorted(str(p) for p in folder.glob("*.jsonl")), expected


def test_parse_writes_the_hash_partitions_so_no_pass_rereads_the_parsed_shards(tmp_path, monkeypatch):
    """The parse task has every hash of its shard in hand: it writes the shard's hash partitions too, so the
    hash pass only re-creates a missing or corrupt one (it re-read and checksummed every parsed shard, and
    cost a
    cluster round trip per stage: 0.04 s of a 0.3 s ingest at 10^6 tokens)."""
    import tracecore.tasks.ingest as ingest_module

    files, expected = repeated_texts_corpus(tmp_path / "in")
    monkeypatch.setattr(ingest_module, "partition_hashes", lambda *a,
                        **k: pytest.fail("re-read a parsed shard"))
    store, refs = ingest(tmp_path, files, dedup_buckets=3, keep_intermediates=True)
    assert store.read_table(refs["documents"]).column("id").to_pylist() == expected
    assert len(store.markers(refs["hashes"])) == 4


def test_a_missing_hash_partition_is_recomputed_from_its_parsed_shard(tmp_path):
    files, expected = repeated_texts_corpus(tmp_path / "in")
    store, refs = ingest(tmp_path, files, dedup_buckets=3, keep_intermediates=True)
    before = store.fs.cat_file(store.shard_path(refs["hashes"], 2))
    for name in ("documents", "drops"):
        store.fs.rm(store.manifest_path(refs[name]))
    store.drop_shard(refs["hashes"], 2)
    store, refs = ingest(tmp_path, files, dedup_buckets=3, keep_intermediates=True)
    assert store.fs.cat_file(store.shard_path(refs["hashes"], 2)) == before
    assert store.read_table(refs["documents"]).column("id").to_pylist() == expected


def test_small_corpora_group_dedup_buckets_into_few_tasks(tmp_path):
    """A dedup task per bucket is a cluster round trip each (16 of them were a third of ingest at 10^6
    tokens): buckets are grouped so a task holds ~`dedup_task_rows` hashes, never more than max(that, rows /
    buckets)."""
    files, expected = repeated_texts_corpus(tmp_path / "in")
    for task_rows, tasks in ((1000, 1), (50, 4), (1, 16)):
        store, refs = ingest(tmp_path / f"r{task_rows}", files, dedup_task_rows=task_rows,
                             keep_intermediates=True)
        assert store.read_table(refs["documents"]).column("id").to_pylist() == expected
        assert store.manifest(refs["drops"])["shards"] == tasks


def test_a_shard_without_duplicates_is_copied_not_re_encoded(tmp_path, monkeypatch):
    """Dedup passes a shard with nothing to drop through as its bytes (checksum checked), instead of decoding
    and re-encoding it: with a unique corpus that pass was a full Parquet round trip of every document."""
    from tracecore.tasks.ingest import dedup_shard

    store = ArtifactStore(str(tmp_path / "store"))
    table = pa.table({"id": ["a", "b"], "text": ["one", "two"]})
    parsed = store.write_shard("parsed/p", 0, table, rejects=1)
    monkeypatch.setattr(ArtifactStore, "read_shard", lambda *a,
                        **k: pytest.fail("decoded a shard it could copy"))
    marker = dedup_shard(store.uri, "documents/d", 0, ("parsed/p", [], {}))
    assert marker["checksum"] == parsed["checksum"] and marker["rows"] == 2 and marker["duplicates"] == 0
    assert "rejects" not in marker
    assert store.fs.cat_file(store.shard_path("documents/d",
                                              0)) == store.fs.cat_file(store.shard_path("parsed/p", 0))


def test_the_parsed_copy_is_cleaned_once_documents_are_committed(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"id": f"a{i}", "text": f"text {i}"}) + "\n"
                                       for i in range(50)))
    store, refs = ingest(tmp_path, [str(d / "a.jsonl")])
    for name in ("parsed", "hashes", "drops"):
        assert store.manifest(refs[name])["cleaned"] and not store.markers(refs[name])
        assert not store.fs.glob(f"{store.artifact_dir(refs[name])}/part-*.parquet")
    assert store.read_table(refs["documents"]).num_rows == 50
    kept, kept_refs = ingest(tmp_path / "kept", [str(d / "a.jsonl")], keep_intermediates=True)
    assert kept.read_table(kept_refs["parsed"]).num_rows == 50
