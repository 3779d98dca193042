"""Stage `ingest`: JSONL (plain/.gz/.zst), Parquet and .txt corpora -> validated, de-duplicated documents.

Two sharded passes, both resumable per shard:
  1. parse: one shard per input split (`tasks/splits.py`: a file, or a byte range / run of row groups of a
     file larger than `ingest.shard_mb`); every record is validated; bad ones go to the `rejects`
     artifact with file, line and reason (nothing is dropped silently); each shard's hashes are written
     partitioned by bucket beside it;
  2. dedup: exact duplicates (sha256 of the text) are removed across all files, first occurrence
     wins in (file, line) order, so the result does not depend on scheduling; hash-partitioned on the
     cluster (`ingest.dedup_buckets`, grouped into tasks of ~`ingest.dedup_task_rows` hashes), so no process
     holds every hash of a large corpus;
  3. near-dedup (`ingest.near_dedup`; on for the sample world, off for a user corpus unless enabled):
     MinHash-LSH over shingles with candidates verified by their true Jaccard (`tasks/near_dedup.py`), three
     more sharded passes (signatures per shard, candidates per bucket group, verification per shard); each
     cluster keeps its first document in (file, line) order, the rest go to the `near_duplicates` artifact
     with their cluster (the kept document's id) and similarity, so nothing is lost.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.storage.fs import NoInputError, input_fingerprint, list_input_files  # noqa: F401 (re-exported)
from tracecore.storage.store import ArtifactStore, read_parquet
from tracecore.tasks.runtime.stage import Planned, Stage, StageRun, plan_artifact


class NearDedupConfig(Strict):
    """MinHash-LSH near-duplicate removal, as DataTrove's and NeMo Curator's fuzzy dedup."""

    enabled: bool | Literal["auto"] = Field("auto", description=(
        "auto: on for the sample world, off for a user corpus (`ingest.paths`), whose near-copies may be "
        "wanted"))
    threshold: float = Field(0.8, gt=0.0, le=1.0, description=(
        "documents whose shingle sets have at least this Jaccard are near-duplicates"))
    shingle: Literal["words", "chars"] = Field("words", description=(
        "shingles: word n-grams of the lower-cased words (DataTrove) or character n-grams (NeMo Curator)"))
    shingle_size: int = Field(5, ge=1, le=64, description="words or characters per shingle")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations (signature length)")
    bands: int | None = Field(None, ge=1, description=(
        "LSH bands (rows per band = num_perm // bands); None: datasketch's optimum for the threshold, "
        "weighted toward recall since every candidate is verified by its true Jaccard"))
    seed: int = 1
    buckets: int = Field(64, ge=1, le=4096, description=(
        "partitions of the band keys, as dedup_buckets (a corpus has bands x documents keys, so more "
        "partitions than exact dedup's keep candidate tasks small up to ~10^9 tokens)"))
    task_rows: int = Field(250_000, ge=1, description=(
        "band keys one candidate task takes on (consecutive partitions are grouped up to about this many)"))
    verify_pairs: int = Field(4096, ge=1, description=(
        "candidate pairs one verification step holds the shingle sets of (memory per task stays flat "
        "however many candidates a shard has)"))
    max_group: int = Field(64, ge=2, description=(
        "an LSH bucket with more members than this pairs each with its first two only (a template shared by "
        "thousands stays linear)"))


class IngestConfig(Strict):
    """Read corpora into validated, de-duplicated document shards."""

    paths: list[str] = Field(default_factory=list, description="globs/URIs; empty = the sample corpus")
    text_field: str = "text"
    id_field: str = "id"
    max_doc_chars: int = Field(1_000_000, ge=1)
    max_reject_fraction: float = Field(0.05, ge=0.0, le=1.0)
    shard_mb: int = Field(256, ge=1, le=65_536, description=(
        "files larger than this are split into shards of about this size (plain JSONL by byte ranges on line "
        "boundaries, Parquet by row groups), so memory per shard is bounded by it; compressed files stay "
        "whole"))
    dedup: bool = True
    keep_intermediates: bool = Field(False, description=(
        "keep the parsed (pre-dedup) copy of the corpus and the dedup partitions after documents are "
        "committed; false: their shards are deleted (manifests kept, flagged cleaned)"))
    dedup_buckets: int = Field(16, ge=1, le=4096, description=(
        "hash partitions of exact dedup: no task holds more than max(dedup_task_rows, 1/buckets of the "
        "corpus's) hashes"))
    dedup_task_rows: int = Field(250_000, ge=1, description=(
        "hashes one dedup task takes on: consecutive buckets are grouped up to about this many rows (a task "
        "per bucket was a cluster round trip each, a third of ingest on a 10^6-token corpus)"))
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)


DOC_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                        ("file", pa.string()), ("line", pa.int64()), ("doc_hash", pa.string())])
REJECT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
                           ("snippet", pa.string())])
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class TooManyRejectsError(RuntimeError):
    pass


def _snippet(raw: Any) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text[:200]


def validate_record(obj: Any, cfg: IngestConfig) -> str | None:
    """Return the reason a parsed record is unusable, or None."""
    if not isinstance(obj, dict):
        return f"record is a JSON {type(obj).__name__}, not an object"
    if cfg.text_field not in obj:
        return f"missing field {cfg.text_field!r}"
    text = obj[cfg.text_field]
    if not isinstance(text, str):
        return f"field {cfg.text_field!r} must be a string, got {type(text).__name__}"
    if not text.strip():
        return f"field {cfg.text_field!r} is empty"
    if len(text) > cfg.max_doc_chars:
        return f"oversize record: {len(text)} chars > max_doc_chars={cfg.max_doc_chars}"
    if "\x00" in text:
        return "text contains NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text contains invalid unicode (lone surrogate escape)"
    doc_id = obj.get(cfg.id_field)
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
        return f"field {cfg.id_field!r} must be a string or integer, got {type(doc_id).__name__}"
    return None


def _lines(fh) -> Iterator[bytes]:
    """Lines of a binary stream. Line iteration keeps every line before a corrupt tail (gzip);
    fsspec's zstd reader has no readline, so it is split from 1 MiB blocks instead."""
    try:
        yield from fh
        return
    except io.UnsupportedOperation:
        pass
    tail = b""
    while block := fh.read(1 << 20):
        *lines, tail = (tail + block).split(b"\n")
        yield from (line + b"\n" for line in lines)
    if tail:
        yield tail


def _range_lines(fh, start: int, end: int) -> Iterator[bytes]:
    """The lines of bytes [start, end) of an uncompressed file (a split: at most ~shard_mb in memory)."""
    fh.seek(start)
    yield from fh.read(end - start).splitlines(keepends=True)


def _iter_jsonl(uri: str, split: dict | None = None) -> Iterator[tuple[int, Any, str | None, bytes]]:
    """Yield (line, record, reject_reason, raw) for each non-blank line; stream errors become a reject."""
    split = split or {}
    first = split.get("first_line", 1)
    line_no = first - 1
    try:
        with fsspec.open(uri, "rb", compression=None if "start" in split else "infer") as fh:
            lines = _range_lines(fh, split["start"], split["end"]) if "start" in split else _lines(fh)
            for line_no, raw in enumerate(lines, start=first):
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue
                try:
                    yield line_no, json.loads(raw.decode("utf-8")), None, raw
                except UnicodeDecodeError as exc:
                    yield line_no, None, f"non-UTF-8 bytes at byte {exc.start}", raw
                except json.JSONDecodeError as exc:
                    yield line_no, None, f"bad JSON: {exc.msg} (column {exc.colno})", raw
    except (EOFError, OSError, ValueError) as exc:
        yield line_no + 1, None, f"unreadable stream after line {line_no}: {type(exc).__name__}: {exc}", b""


def _iter_parquet(uri: str, cfg: IngestConfig,
                  split: dict | None = None) -> Iterator[tuple[int, Any, str | None, bytes]]:
    split = split or {}
    try:
        with fsspec.open(uri, "rb") as fh:
            table = read_parquet(fh, row_groups=split.get("row_groups"))
    except (OSError, ValueError, pa.ArrowException) as exc:  # damaged or not Parquet at all
        yield 0, None, f"unreadable Parquet file: {exc}", b""
        return
    if cfg.text_field not in table.column_names:
        yield 0, None, f"Parquet file has no {cfg.text_field!r} column (columns: {table.column_names})", b""
        return
    for row_no, row in enumerate(table.to_pylist(), start=split.get("first_line", 1)):
        yield row_no, row, None, b""


def _iter_text(uri: str) -> Iterator[tuple[int, Any, str | None, bytes]]:
    with fsspec.open(uri, "rb", compression="infer") as fh:
        raw = fh.read()
    try:
        yield 1, {"text": raw.decode("utf-8"), "id": PurePosixPath(uri).stem}, None, raw
    except UnicodeDecodeError as exc:
        yield 1, None, f"non-UTF-8 bytes at byte {exc.start}", raw[:200]


def iter_records(split: dict, cfg: IngestConfig) -> Iterator[tuple[int, Any, str | None, bytes]]:
    """The records of one split (`tasks/splits.py`: a whole file, a byte range or a run of row groups)."""
    uri = split["uri"]
    name = PurePosixPath(uri).name.lower()
    for comp in (".gz", ".zst", ".bz2", ".xz"):
        name = name.removesuffix(comp)
    if name.endswith(JSONL_SUFFIXES):
        return _iter_jsonl(uri, split)
    if name.endswith(".parquet"):
        return _iter_parquet(uri, cfg, split)
    if name.endswith(".txt"):
        return _iter_text(uri)
    reason = (f"unsupported file type {PurePosixPath(uri).name!r} "
              "(use .jsonl/.json/.parquet/.txt, optionally .gz/.zst)")
    return iter([(0, None, reason, b"")])


def parse_file(store_uri: str, ref: str, shard: int, split: dict, cfg: IngestConfig, rejects_ref: str,
               hashes: tuple[str, int]) -> dict:
    """Parse + validate one split of an input file into a documents shard, a rejects shard and the shard's
    dedup hash partitions (`hashes`: ref, buckets), all with the same index; the documents shard is written
    last, so
    its marker means all three are there."""
    store, uri, name = ArtifactStore(store_uri), split["uri"], PurePosixPath(split["uri"]).name
    columns: dict[str, list] = {field: [] for field in DOC_SCHEMA.names}
    rejects: list[dict] = []
    for line, obj, reason, raw in iter_records(split, cfg):
        reason = reason or validate_record(obj, cfg)
        if reason:
            rejects.append({"file": uri, "line": line, "reason": reason,
                            "snippet": _snippet(raw or (json.dumps(obj, default=str) if obj is not None
                                                        else ""))})
            continue
        text, doc_id, source = obj[cfg.text_field], obj.get(cfg.id_field), obj.get("source")
        for field, value in (("id", str(doc_id) if doc_id is not None else f"{name}:{line}"), ("text", text),
                             ("source", source if isinstance(source, str) else name), ("file", uri),
                             ("line", line), ("doc_hash", hashlib.sha256(text.encode()).hexdigest()[:32])):
            columns[field].append(value)
    store.write_shard(rejects_ref, shard, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    hashes_ref, buckets = hashes
    store.write_shard(hashes_ref, shard, hash_partitions(columns["doc_hash"], shard, buckets),
                      row_groups_by="bucket")
    docs = pa.Table.from_pydict(columns, schema=DOC_SCHEMA)
    return store.write_shard(ref, shard, docs, rejects=len(rejects))


# ---- exact dedup, partitioned by hash on the cluster ---------------------------------------------------- No
# process holds every hash: (1) each parse task splits its shard's hashes into `buckets` partitions, written
# as one file per parsed shard with one row group per bucket; (2) one task per group of consecutive buckets
# (~`dedup_task_rows` hashes) reads those row groups of every such file, finds for each hash its first
# occurrence in (shard, row) order and lists the later ones; (3) each shard drops its listed rows. The flow
# process holds only the duplicates.
HASH_SCHEMA = pa.schema([("bucket", pa.uint16()), ("doc_hash", pa.string()), ("shard", pa.int32()),
                         ("row", pa.int64())])


def bucket_of(doc_hash: str, buckets: int) -> int:
    return int(doc_hash[:8], 16) % buckets


def hash_partitions(hashes: list[str], shard: int, buckets: int) -> pa.Table:
    """A shard's hashes with their rows, ordered by bucket (then row): one Parquet row group per bucket."""
    bucket = np.fromiter((bucket_of(h, buckets) for h in hashes), np.uint16, len(hashes))
    order = np.argsort(bucket, kind="stable")
    return pa.table({"bucket": bucket[order], "doc_hash": pa.array(hashes, pa.string()).take(order),
                     "shard": np.full(len(hashes), shard, np.int32), "row": order.astype(np.int64)},
                    schema=HASH_SCHEMA)


def partition_hashes(store_uri: str, ref: str, shard: int, item: tuple[str, int]) -> dict:
    """Re-create the hash partitions of parsed shard `shard` (parse writes them; this only repairs a missing
    or corrupt one)."""
    store = ArtifactStore(store_uri)
    parsed_ref, buckets = item
    hashes = store.read_shard(parsed_ref, shard, columns=["doc_hash"]).column(0).to_pylist()
    return store.write_shard(ref, shard, hash_partitions(hashes, shard, buckets), row_groups_by="bucket")


def bucket_groups(rows: int, buckets: int, task_rows: int) -> list[tuple[int, int]]:
    """Consecutive bucket ranges [first, last], one dedup task each: as many as keep a task near `task_rows`
    hashes (at least 1, at most one per bucket). Depends only on the corpus and config, so a resumed run maps
    the same groups."""
    groups = max(1, min(buckets, -(-rows // task_rows)))
    cuts = [round(g * buckets / groups) for g in range(groups + 1)]
    return [(cuts[g], cuts[g + 1] - 1) for g in range(groups)]


def bucket_duplicates(store_uri: str, ref: str, group: int, item: tuple[str, int, tuple[int, int]]) -> dict:
    """(shard, row) of every document whose text occurred earlier in (shard, row) order, within one group of
    buckets (a hash lives in one bucket, so a group is deduplicated on its own). The hash files are read
    unverified: `map_shards` verified every reused one before (fresh ones were written by this run), and
    checksumming a whole file per group would read it once per group."""
    store = ArtifactStore(store_uri)
    hashes_ref, n_shards, (first, last) = item
    table = pa.concat_tables([store.read_shard_rows(hashes_ref, s, "bucket", first, last)
                              for s in range(n_shards)])
    table = table.sort_by([("shard", "ascending"), ("row", "ascending")])
    seen, drops = set(), []
    for h, s, r in zip(*(table.column(c).to_pylist() for c in ("doc_hash", "shard", "row"))):
        if h in seen:
            drops.append((s, r))
        seen.add(h)
    out = pa.table({"shard": [d[0] for d in drops], "row": [d[1] for d in drops]},
                   schema=pa.schema([("shard", pa.int32()), ("row", pa.int64())]))
    return store.write_shard(ref, group, out)


def dedup_shard(store_uri: str, ref: str, shard: int, item: tuple[str, list[int], dict],
                near_ref: str | None = None) -> dict:
    """A parsed shard without its duplicate and near-duplicate rows (the near ones, with their cluster, go to
    `near_ref` first, so the documents marker means both are there); one with none to drop is copied as its
    bytes (no decode and re-encode: with a unique corpus this pass was a full Parquet round trip of every
    document)."""
    store = ArtifactStore(store_uri)
    parsed_ref, drop_rows, near = item
    table = store.read_shard(parsed_ref, shard) if drop_rows or near else None
    if near_ref:
        write_near_duplicates(store, near_ref, shard, table, near)
    if table is None:
        return store.copy_shard(parsed_ref, shard, ref, duplicates=0, near_duplicates=0)
    drop = set(drop_rows) | set(near)
    kept = table.filter(pa.array([i not in drop for i in range(table.num_rows)], type=pa.bool_()))
    return store.write_shard(ref, shard, kept, duplicates=len(drop_rows), near_duplicates=len(near))


def write_near_duplicates(store: ArtifactStore, ref: str, shard: int, table: pa.Table | None,
                          near: dict[int, tuple[str, float]]) -> None:
    """The shard's near-duplicates, whole, with their cluster (the kept document's id) and similarity."""
    rows = sorted(near)
    docs = table.take(rows) if rows else DOC_SCHEMA.empty_table()
    docs = docs.append_column("cluster", pa.array([near[r][0] for r in rows], pa.string()))
    store.write_shard(ref, shard, docs.append_column("similarity", pa.array([near[r][1] for r in rows],
                                                                            pa.float64())))


def duplicate_rows(run: StageRun, parsed_markers: list[dict]) -> dict[int, list[int]]:
    """shard -> rows to drop, from the partitioned passes (each resumable per shard / per group of
    buckets)."""
    store, buckets, refs, n_shards = run.store, run.cfg.dedup_buckets, run.plan.refs, len(parsed_markers)
    # re-creates only a missing one
    run.map("hashes", partition_hashes, [(refs["parsed"], buckets)] * n_shards)
    run.commit("hashes", {"intermediate": True, "buckets": buckets}, expected_shards=n_shards)
    groups = bucket_groups(sum(m["rows"] for m in parsed_markers), buckets, run.cfg.dedup_task_rows)
    run.map("drops", bucket_duplicates, [(refs["hashes"], n_shards, group) for group in groups])
    run.commit("drops", {"intermediate": True, "bucket_groups": len(groups)}, expected_shards=len(groups))
    out: dict[int, list[int]] = {}
    for s, r in zip(*(store.read_table(refs["drops"]).column(c).to_pylist() for c in ("shard", "row"))):
        out.setdefault(s, []).append(r)
    return out


def near_duplicate_rows(run: StageRun, parsed_markers: list[dict],
                        drops: dict[int, list[int]]) -> dict[int, dict[int, tuple[str, float]]]:
    """shard -> row -> (cluster, similarity) of every near-duplicate to drop, from three sharded passes
    (`tasks/near_dedup.py`: signatures, candidates, verification), each resumable per shard or group."""
    from tracecore.tasks import near_dedup as nd

    cfg, refs, n_shards = run.cfg.near_dedup, run.plan.refs, len(parsed_markers)
    bands, rows = nd.band_shape(cfg.threshold, cfg.num_perm, cfg.bands)
    params = {"shingle": cfg.shingle, "shingle_size": cfg.shingle_size, "num_perm": cfg.num_perm,
              "seed": cfg.seed, "bands": bands, "rows": rows, "buckets": cfg.buckets,
              "verify_pairs": cfg.verify_pairs}
    signed = run.map("near_signatures", nd.signature_shard,
                     [(refs["parsed"], drops.get(s, [])) for s in range(n_shards)], params=params)
    run.commit("near_signatures", {"intermediate": True, "bands": bands, "rows_per_band": rows},
               expected_shards=n_shards)
    groups = bucket_groups(sum(m["rows"] for m in signed.markers), cfg.buckets, cfg.task_rows)
    run.map("near_candidates", nd.candidate_group, [(refs["near_signatures"], n_shards, g) for g in groups],
            max_group=cfg.max_group)
    run.commit("near_candidates", {"intermediate": True}, expected_shards=len(groups))
    candidates = run.store.read_table(refs["near_candidates"]).to_pylist()
    by_shard: dict[int, set] = {}
    for p in candidates:
        by_shard.setdefault(p["shard_a"], set()).add((p["shard_a"], p["row_a"], p["shard_b"], p["row_b"]))
    run.map("near_pairs", nd.verify_shard, [(refs["parsed"], sorted(by_shard.get(s, ()))) for s in
                                            range(n_shards)], params=params)
    run.commit("near_pairs", {"intermediate": True, "candidates": sum(map(len, by_shard.values()))},
               expected_shards=n_shards)
    edges = [e for e in run.store.read_table(refs["near_pairs"]).to_pylist() if e["jaccard"] >= cfg.threshold]
    ids = {(e[f"shard_{x}"], e[f"row_{x}"]): e[f"id_{x}"] for e in edges for x in "ab"}
    members = nd.clusters(((e["shard_a"], e["row_a"]), (e["shard_b"], e["row_b"]), e["jaccard"])
                          for e in edges)
    out: dict[int, dict[int, tuple[str, float]]] = {}
    for (s, r), (kept, sim) in members.items():
        out.setdefault(s, {})[r] = (ids[kept], round(sim, 6))
    return out


def near_dedup_outputs(cfg: IngestConfig, inputs: dict[str, str], code: str) -> dict[str, Planned]:
    """The near-dedup outputs, planned only where it runs (`near_dedup.enabled`; auto: the sample world)."""
    enabled = cfg.near_dedup.enabled
    if not ("sample" in inputs if enabled == "auto" else enabled):
        return {}
    return {name: plan_artifact("ingest", folder, cfg.fingerprint(), inputs, code) for name, folder in
            (("near_signatures", "near_dedup_signatures"), ("near_candidates", "near_dedup_candidates"),
             ("near_pairs", "near_dedup_pairs"), ("near_duplicates", "near_duplicates"))}


def check_reject_fraction(parsed_markers: list[dict], rejects_uri: str, cfg: IngestConfig) -> dict:
    rows = sum(m["rows"] for m in parsed_markers)
    rejected = sum(m.get("rejects", 0) for m in parsed_markers)
    fraction = rejected / max(rows + rejected, 1)
    if fraction > cfg.max_reject_fraction:
        raise TooManyRejectsError(
            f"ingest: {rejected} of {rows + rejected} records rejected ({fraction:.1%}) > "
            f"ingest.max_reject_fraction={cfg.max_reject_fraction:.1%}; see the rejects artifact at "
            f"{rejects_uri}")
    return {"documents_read": rows + rejected, "rejected": rejected, "reject_fraction": round(fraction, 6)}


def input_files(pipeline_cfg) -> dict[str, str]:
    """The sample world only when the user gave no corpus (`ingest.paths`)."""
    return {} if pipeline_cfg.ingest.paths else {"sample": "sample.sample"}


def user_files(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """User corpora are fingerprinted by their content; sample files are identified by the sample artifact."""
    if not pipeline_cfg.ingest.paths:
        return {}, {}
    files = list_input_files(pipeline_cfg.ingest.paths)
    return {"files": input_fingerprint(files)}, {"files": files}


def input_splits(files: list[str], cfg: IngestConfig, log) -> list[dict]:
    """Every file's shards (`tasks/splits.py`), in file order (dedup's first occurrence stays (file,
    line))."""
    from tracecore.tasks.splits import COMPRESSED, plan_splits

    bound, splits = cfg.shard_mb << 20, []
    for uri in files:
        parts = plan_splits(uri, bound)
        if len(parts) == 1 and uri.lower().endswith(COMPRESSED):
            with fsspec.open(uri, "rb") as fh:
                if fh.fs.size(fh.path) > bound:
                    log.info("ingest: %s is compressed and larger than ingest.shard_mb=%d; it is one shard "
                             "(its memory grows with it): split it, or store it uncompressed or as "
                             "Parquet", uri,
                             cfg.shard_mb)
        splits += parts
    if len(splits) > len(files):
        log.info("ingest: %d input files -> %d shards of <= ~%d MB", len(files), len(splits), cfg.shard_mb)
    return splits


def run_ingest(run: StageRun) -> None:
    """Parse every file, enforce the reject budget, de-duplicate, commit `documents` + `rejects`.

    Object stores have no lock across hosts, so a second run of the same config may be mid-way when the first
    commits `documents` and cleans the intermediates this one reads: it then finds `documents` committed
    (identical bytes, content-addressed) and stops there instead of failing."""
    from tracecore.storage.store import MissingArtifactError

    try:
        ingest_documents(run)
    except (FileNotFoundError, MissingArtifactError):
        if not run.store.is_committed(run.ref("documents")):
            raise
        run.log.info("ingest: %s was committed by another run of the same config meanwhile; using it",
                     run.ref("documents"))


def ingest_documents(run: StageRun) -> None:
    from tracecore.tasks.world import sample_corpus_glob

    store, cfg = run.store, run.cfg
    files = run.args.get("files") or list_input_files([sample_corpus_glob(store.uri, run.inputs["sample"])])
    splits = input_splits(files, cfg, run.log)
    parsed = run.map("parsed", parse_file, splits, cfg=cfg, rejects_ref=run.ref("rejects"),
                     hashes=(run.ref("hashes"), cfg.dedup_buckets))
    run.commit("rejects", expected_shards=len(splits))
    run.commit("parsed", {"intermediate": True}, expected_shards=len(splits))
    stats = check_reject_fraction(parsed.markers, store.display_path(run.ref("rejects")), cfg)
    drops = duplicate_rows(run, parsed.markers) if cfg.dedup else {}
    near_ref = run.plan.refs.get("near_duplicates")
    near = near_duplicate_rows(run, parsed.markers, drops) if near_ref else {}
    deduped = run.map("documents", dedup_shard,
                      [(run.ref("parsed"), drops.get(i, []), near.get(i, {})) for i in range(len(splits))],
                      near_ref=near_ref)
    stats["duplicates"] = sum(m.get("duplicates", 0) for m in deduped.markers)
    if near_ref:
        stats["near_duplicates"] = sum(m.get("near_duplicates", 0) for m in deduped.markers)
        stats["near_duplicate_clusters"] = len({c for rows in near.values() for c, _ in rows.values()})
        run.commit("near_duplicates", {"threshold": cfg.near_dedup.threshold, "report_columns": [
            "cluster", "id", "file", "line", "similarity"]}, expected_shards=len(splits))
    run.commit("documents", {**stats, "input_files": files, "seconds": parsed.seconds + deduped.seconds,
                             "skipped_shards": parsed.skipped + deduped.skipped}, expected_shards=len(splits))
    # documents are committed: the parsed copy and the hash partitions are spent
    if not cfg.keep_intermediates:
        for name in ("parsed", "hashes", "drops", "near_signatures", "near_candidates", "near_pairs"):
            if name in run.plan.refs and store.is_committed(run.ref(name)):
                store.clean(run.ref(name))
    near_count = stats.get("near_duplicates", 0)
    run.log.info("ingest: %d documents, %d rejects, %d duplicates, %d near-duplicates -> %s",
                 stats["documents_read"] - stats["rejected"] - stats["duplicates"] - near_count,
                 stats["rejected"], stats["duplicates"], near_count, run.ref("documents"))


STAGE = Stage("ingest", IngestConfig, {"documents": "documents", "rejects": "rejects", "parsed": "parsed",
                                       "hashes": "dedup_hashes", "drops": "dedup_drops"},
              run_ingest, needs=input_files, external=user_files, subartifacts=near_dedup_outputs,
              description="corpora -> validated, de-duplicated document shards (+ rejects)")
