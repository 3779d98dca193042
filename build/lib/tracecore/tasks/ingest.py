"""Stage `ingest`: JSONL (plain/.gz/.zst), Parquet and .txt corpora -> validated, de-duplicated documents.

Two sharded passes, both resumable per shard:
  1. parse: one shard per input file; every record is validated; bad ones go to the `rejects`
     artifact with file, line and reason (nothing is dropped silently);
  2. dedup: exact duplicates (sha256 of the text) are removed across all files, first occurrence
     wins in (file, line) order, so the result does not depend on scheduling.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from tracecore.configs.schema import IngestConfig
from tracecore.storage.fs import NoInputError, input_fingerprint, list_input_files  # noqa: F401 (re-exported)
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.common import map_shards
from tracecore.tasks.stage import Stage, StageRun

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


def _iter_jsonl(uri: str) -> Iterator[tuple[int, Any, str | None, bytes]]:
    """Yield (line, record, reject_reason, raw) for each non-blank line; stream errors become a reject."""
    line_no = 0
    try:
        with fsspec.open(uri, "rb", compression="infer") as fh:
            for line_no, raw in enumerate(_lines(fh), start=1):
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


def _iter_parquet(uri: str, cfg: IngestConfig) -> Iterator[tuple[int, Any, str | None, bytes]]:
    try:
        with fsspec.open(uri, "rb") as fh:
            table = pq.read_table(fh)
    except (OSError, ValueError, pa.ArrowException) as exc:  # damaged or not Parquet at all
        yield 0, None, f"unreadable Parquet file: {exc}", b""
        return
    if cfg.text_field not in table.column_names:
        yield 0, None, f"Parquet file has no {cfg.text_field!r} column (columns: {table.column_names})", b""
        return
    for row_no, row in enumerate(table.to_pylist(), start=1):
        yield row_no, row, None, b""


def _iter_text(uri: str) -> Iterator[tuple[int, Any, str | None, bytes]]:
    with fsspec.open(uri, "rb", compression="infer") as fh:
        raw = fh.read()
    try:
        yield 1, {"text": raw.decode("utf-8"), "id": PurePosixPath(uri).stem}, None, raw
    except UnicodeDecodeError as exc:
        yield 1, None, f"non-UTF-8 bytes at byte {exc.start}", raw[:200]


def iter_records(uri: str, cfg: IngestConfig) -> Iterator[tuple[int, Any, str | None, bytes]]:
    name = PurePosixPath(uri).name.lower()
    for comp in (".gz", ".zst", ".bz2", ".xz"):
        name = name.removesuffix(comp)
    if name.endswith(JSONL_SUFFIXES):
        return _iter_jsonl(uri)
    if name.endswith(".parquet"):
        return _iter_parquet(uri, cfg)
    if name.endswith(".txt"):
        return _iter_text(uri)
    reason = (f"unsupported file type {PurePosixPath(uri).name!r} "
              "(use .jsonl/.json/.parquet/.txt, optionally .gz/.zst)")
    return iter([(0, None, reason, b"")])


def parse_file(store_uri: str, ref: str, shard: int, uri: str, cfg: IngestConfig, rejects_ref: str) -> dict:
    """Parse + validate one input file into a documents shard and a rejects shard (same index)."""
    store = ArtifactStore(store_uri)
    docs: list[dict] = []
    rejects: list[dict] = []
    for line, obj, reason, raw in iter_records(uri, cfg):
        reason = reason or validate_record(obj, cfg)
        if reason:
            rejects.append({"file": uri, "line": line, "reason": reason,
                            "snippet": _snippet(raw or (json.dumps(obj, default=str) if obj is not None else ""))})
            continue
        text = obj[cfg.text_field]
        doc_id = obj.get(cfg.id_field)
        source = obj.get("source")
        docs.append({"id": str(doc_id) if doc_id is not None else f"{PurePosixPath(uri).name}:{line}",
                     "text": text, "source": source if isinstance(source, str) else PurePosixPath(uri).name,
                     "file": uri, "line": line, "doc_hash": hashlib.sha256(text.encode()).hexdigest()[:32]})
    store.write_shard(rejects_ref, shard, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    return store.write_shard(ref, shard, pa.Table.from_pylist(docs, schema=DOC_SCHEMA), rejects=len(rejects))


def duplicate_mask(hash_columns: list[list[str]]) -> list[list[bool]]:
    """keep[s][i] is False for a document whose text already appeared earlier (shard, row order)."""
    seen: set[str] = set()
    keep = []
    for hashes in hash_columns:
        shard_keep = []
        for h in hashes:
            shard_keep.append(h not in seen)
            seen.add(h)
        keep.append(shard_keep)
    return keep


def dedup_shard(store_uri: str, ref: str, shard: int, item: tuple[str, list[bool]]) -> dict:
    store = ArtifactStore(store_uri)
    parsed_ref, keep = item
    table = store.read_shard(parsed_ref, shard)
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    return store.write_shard(ref, shard, kept, duplicates=table.num_rows - kept.num_rows)


def check_reject_fraction(parsed_markers: list[dict], rejects_uri: str, cfg: IngestConfig) -> dict:
    rows = sum(m["rows"] for m in parsed_markers)
    rejected = sum(m.get("rejects", 0) for m in parsed_markers)
    fraction = rejected / max(rows + rejected, 1)
    if fraction > cfg.max_reject_fraction:
        raise TooManyRejectsError(
            f"ingest: {rejected} of {rows + rejected} records rejected ({fraction:.1%}) > "
            f"ingest.max_reject_fraction={cfg.max_reject_fraction:.1%}; see the rejects artifact at {rejects_uri}")
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


def run_ingest(run: StageRun) -> None:
    """Parse every file, enforce the reject budget, de-duplicate, commit `documents` + `rejects`."""
    from tracecore.tasks.sample import sample_corpus_glob

    store, cfg = run.store, run.cfg
    files = run.args.get("files") or list_input_files([sample_corpus_glob(store.uri, run.inputs["sample"])])
    parsed = map_shards("ingest", store, run.ref("parsed"), parse_file, files, run.address, cfg=cfg,
                        rejects_ref=run.ref("rejects"))
    run.commit("rejects", expected_shards=len(files))
    run.commit("parsed", expected_shards=len(files))
    stats = check_reject_fraction(parsed.markers, store.display_path(run.ref("rejects")), cfg)
    hashes = [store.read_shard(run.ref("parsed"), i, columns=["doc_hash"]).column(0).to_pylist()
              for i in range(len(files))]
    keep = duplicate_mask(hashes) if cfg.dedup else [[True] * len(h) for h in hashes]
    deduped = map_shards("dedup", store, run.ref("documents"), dedup_shard,
                         [(run.ref("parsed"), k) for k in keep], run.address)
    stats["duplicates"] = sum(m.get("duplicates", 0) for m in deduped.markers)
    run.commit("documents", {**stats, "input_files": files, "seconds": parsed.seconds + deduped.seconds,
                             "skipped_shards": parsed.skipped + deduped.skipped}, expected_shards=len(files))
    run.log.info("ingest: %d documents, %d rejects, %d duplicates -> %s", stats["documents_read"] -
                 stats["rejected"] - stats["duplicates"], stats["rejected"], stats["duplicates"], run.ref("documents"))


STAGE = Stage("ingest", IngestConfig, {"documents": "documents", "rejects": "rejects", "parsed": "parsed"},
              run_ingest, needs=input_files, external=user_files,
              description="corpora -> validated, de-duplicated document shards (+ rejects)")
