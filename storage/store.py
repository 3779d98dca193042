"""Parquet artifact store: content-addressed artifacts, atomic shards, completion markers.

Layout under the store root (local path or any fsspec URI)::

    artifacts/<name>/<fingerprint>/part-00000.parquet   one file per shard
    artifacts/<name>/<fingerprint>/_markers/00000.json  shard is complete only when this exists
    artifacts/<name>/<fingerprint>/_MANIFEST.json       artifact is committed (lineage, checksum)
    artifacts/<name>/<fingerprint>/_files/...           non-tabular payloads (tokenizer, model); the leading
                                                        underscore makes pandas/pyarrow skip it, so the folder
                                                        reads as one table (stores before it used `files/`)
    runs/<run_id>/run.json, report.md, plots/           one folder per pipeline run

An artifact reference (`ref`) is the string ``"<name>/<fingerprint>"``. The fingerprint hashes
the stage config, the input fingerprints and the code version, so the same work always lands
in the same folder: that is what makes resume and concurrent runs safe (see README).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tracecore.storage.files import ArtifactFiles
from tracecore.storage.fs import (
    atomic_write_bytes,
    file_checksum,
    file_stamp,
    is_local,
    is_temporary,
    open_root,
    read_json,
    safe_join,
    sha256_bytes,
    write_json,
)


class CorruptShardError(RuntimeError):
    """A shard whose bytes no longer match the checksum recorded when it was written."""


def corrupt_shard(path: str) -> CorruptShardError:
    """The one-line error for a shard whose bytes do not match its marker (read, verified or copied)."""
    return CorruptShardError(f"checksum mismatch for {path}: the shard is corrupt; delete it or re-run")


class MissingArtifactError(FileNotFoundError):
    pass


def write_row_groups(table: pa.Table, column: str, sink, compression: str = "zstd",
                     use_dictionary: bool | list[str] = True) -> None:
    """One Parquet row group per run of equal values of `column` (the table is ordered by it)."""
    values = table[column].to_numpy()
    cuts = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(values)]
    with pq.ParquetWriter(sink, table.schema, compression=compression,
                          use_dictionary=use_dictionary) as writer:
        if len(values) == 0:
            writer.write_table(table)
        for lo, hi in itertools.pairwise(cuts):
            if hi > lo:
                writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)


def read_parquet(source, columns: list[str] | None = None, row_groups: list[int] | None = None) -> pa.Table:
    """Every Parquet read of tracecore (shards, Parquet inputs, task files), from an open file object or an
    already opened `pq.ParquetFile`.

    Without Arrow's thread pool: a process that exits right after a threaded read through a Python file object
    aborts at teardown ("terminate called without an active exception", exit 134; apache/arrow#34314; seen
    here with pyarrow 25 and 26), after its work is done; tasks read one shard per
    single-threaded Dask worker, so the pool bought little. Through `ParquetFile`, not `pq.read_table`, which
    imports pyarrow.dataset and pandas (~0.3 s of each process's first read)."""
    parquet = source if isinstance(source, pq.ParquetFile) else pq.ParquetFile(source)
    if row_groups is None:
        return parquet.read(columns=columns, use_threads=False)
    return parquet.read_row_groups(row_groups, columns=columns, use_threads=False)


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


@dataclass(frozen=True)
class ArtifactStatus:
    """The store's one answer about an artifact: committed or not, its shard markers, its corrupt parts."""

    ref: str
    committed: bool
    markers: tuple[dict, ...]
    corrupt: tuple[str, ...]

    @property
    def reusable(self) -> bool:
        return self.committed and not self.corrupt


class ArtifactStore(ArtifactFiles):
    """Reads and writes artifacts under one root. Cheap to construct; safe to send to Dask workers."""

    def __init__(self, root: str | os.PathLike):
        self.uri = str(root)
        self.fs, self.root = open_root(self.uri)

    def __reduce__(self):  # rebuild from the URI on workers instead of pickling fs handles
        return (ArtifactStore, (self.uri,))

    # ---- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return safe_join(self.root, *parts)

    def artifact_dir(self, ref: str) -> str:
        return self.path("artifacts", ref)

    def display_path(self, ref: str = "") -> str:
        """A path a user can paste into pandas/pyarrow."""
        base = self.artifact_dir(ref) if ref else self.root
        return base if is_local(self.fs) else self.fs.unstrip_protocol(base)

    # ---- shards --------------------------------------------------------------------------
    def _marker_path(self, ref: str, shard: int) -> str:
        return f"{self.artifact_dir(ref)}/_markers/{shard:05d}.json"

    def shard_path(self, ref: str, shard: int) -> str:
        return f"{self.artifact_dir(ref)}/{shard_name(shard)}"

    def shard_done(self, ref: str, shard: int) -> bool:
        return self.fs.exists(self._marker_path(ref, shard)) and self.fs.exists(self.shard_path(ref, shard))

    def write_shard(self, ref: str, shard: int, table: pa.Table, row_groups_by: str | None = None,
                    compression: str = "zstd", use_dictionary: bool | list[str] = True, **stats: Any) -> dict:
        """Write one shard atomically, then its marker. Returns the marker. `row_groups_by`: the table is
        ordered by that column and each of its values becomes its own row group (see `read_shard_rows`).
        `compression`: a Parquet codec (zstd by default; an intermediate read once may prefer the faster lz4).
        `use_dictionary`: the columns to dictionary-encode (all by default); a column of mostly distinct
        values
        (packed n-gram keys) is cheaper to write and read without."""
        start = time.perf_counter()
        sink = io.BytesIO()
        if row_groups_by is None:
            pq.write_table(table, sink, compression=compression, use_dictionary=use_dictionary)
        else:
            write_row_groups(table, row_groups_by, sink, compression, use_dictionary)
        data = sink.getvalue()
        atomic_write_bytes(self.fs, self.shard_path(ref, shard), data)
        marker = {
            "shard": shard,
            "file": shard_name(shard),
            "rows": table.num_rows,
            "bytes": len(data),
            "checksum": sha256_bytes(data),
            "mtime": self._stamp(self.shard_path(ref, shard)),
            "schema": table.schema.to_string(show_schema_metadata=False),
            "write_seconds": round(time.perf_counter() - start, 4),
            **stats,
        }
        write_json(self.fs, self._marker_path(ref, shard), marker)
        return marker

    def copy_shard(self, src_ref: str, shard: int, ref: str, **stats: Any) -> dict:
        """Shard `shard` of `src_ref` as shard `shard` of `ref`, byte for byte (a step that passes a shard
        through unchanged need not decode and re-encode it), checked against the source's checksum, written
        atomically,
        then its marker: the source's file facts plus `stats`. Returns the marker."""
        source = read_json(self.fs, self._marker_path(src_ref, shard))
        start = time.perf_counter()
        data = self.fs.cat_file(self.shard_path(src_ref, shard))
        if sha256_bytes(data) != source["checksum"]:
            raise corrupt_shard(self.shard_path(src_ref, shard))
        atomic_write_bytes(self.fs, self.shard_path(ref, shard), data)
        marker = {**{k: source[k] for k in ("shard", "file", "rows", "bytes", "checksum", "schema")},
                  "mtime": self._stamp(self.shard_path(ref, shard)),
                  "write_seconds": round(time.perf_counter() - start, 4), **stats}
        write_json(self.fs, self._marker_path(ref, shard), marker)
        return marker

    def markers(self, ref: str) -> list[dict]:
        folder = f"{self.artifact_dir(ref)}/_markers"
        if not self.fs.exists(folder):
            return []
        paths = sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")
                       and not is_temporary(p))
        return [read_json(self.fs, p) for p in paths]

    def read_shard(self, ref: str, shard: int, columns: list[str] | None = None,
                   verify: bool = True) -> pa.Table:
        path = self.shard_path(ref, shard)
        if not self.fs.exists(self._marker_path(ref, shard)):
            raise MissingArtifactError(f"shard {shard} of {ref} is not complete (no marker): {path}")
        if verify:
            self.verify_shard(ref, shard)
        with self.fs.open(path, "rb") as fh:
            return read_parquet(fh, columns)

    def read_shard_rows(self, ref: str, shard: int, column: str, low: Any, high: Any = None) -> pa.Table:
        """The rows of a `row_groups_by=column` shard whose `column` is in [low, high] (high: low by default),
        reading only the row groups whose statistics allow it. Unverified: the caller has checked the shard
        (see
        `map_shards`)."""
        high = low if high is None else high
        with self.fs.open(self.shard_path(ref, shard), "rb") as fh:
            parquet = pq.ParquetFile(fh)
            index = parquet.schema_arrow.get_field_index(column)
            meta = parquet.metadata
            stats = [meta.row_group(i).column(index).statistics for i in range(meta.num_row_groups)]
            known = [st is not None and st.has_min_max for st in stats]
            groups = [i for i, st in enumerate(stats) if not known[i] or (st.max >= low and st.min <= high)]
            table = read_parquet(parquet, row_groups=groups) if groups else parquet.schema_arrow.empty_table()
        if all(known[i] and low <= stats[i].min and stats[i].max <= high for i in groups):
            return table
        inside = pc.and_(pc.greater_equal(table[column], low), pc.less_equal(table[column], high))
        return table.filter(inside)  # the filter copies every row

    def verify_shard(self, ref: str, shard: int) -> None:
        path = self.shard_path(ref, shard)
        if not self.part_intact(path, read_json(self.fs, self._marker_path(ref, shard)), checksums=True):
            raise corrupt_shard(path)

    def part_intact(self, path: str, entry: dict, checksums: bool = False) -> bool:
        """A shard or file still is what its record (marker, manifest entry) says was written. rsync's rule:
        same size and modification stamp, no byte read; a changed stamp (a copied store) or `checksums` hashes
        it."""
        stamp = file_stamp(self.fs, path)
        if stamp is None or stamp[0] != entry["bytes"]:
            return False
        if not checksums and entry.get("mtime") and stamp[1] == entry["mtime"]:
            return True
        return file_checksum(self.fs, path) == entry["checksum"]

    def status(self, ref: str, checksums: bool = False) -> ArtifactStatus:
        """Committed?, its markers, and the committed artifact's parts that no longer match their records:
        what
        every "is this done and intact" question reads, from listings and JSON only (see `part_intact`)."""
        committed, markers = self.is_committed(ref), self.markers(ref)
        corrupt: list[str] = []
        if committed:
            corrupt = [self.shard_path(ref, m["shard"]) for m in markers
                       if not self.part_intact(self.shard_path(ref, m["shard"]), m, checksums)]
            base = self.files_dir(ref)
            corrupt += [f"{base}/{e['file']}" for e in self.manifest(ref).get("files", [])
                        if not self.part_intact(f"{base}/{e['file']}", e, checksums)]
        return ArtifactStatus(ref, committed, tuple(markers), tuple(corrupt))

    def corrupt_parts(self, ref: str, checksums: bool = False) -> list[str]:
        """Paths of a committed artifact's shards and files that no longer match its records."""
        self.manifest(ref)  # raises unless committed
        return list(self.status(ref, checksums).corrupt)

    def repair(self, ref: str, status: ArtifactStatus | None = None) -> list[str]:
        """Un-commit an artifact with corrupt parts and forget its corrupt shards, so the next run
        recomputes exactly those (files such as model weights: the whole artifact). Returns the paths."""
        status = status or self.status(ref)
        if status.corrupt:
            if self.is_committed(ref):
                self.fs.rm(self.manifest_path(ref))
            for m in status.markers:
                if self.shard_path(ref, m["shard"]) in status.corrupt:
                    self.drop_shard(ref, m["shard"])
        return list(status.corrupt)

    def drop_shard(self, ref: str, shard: int) -> None:
        """Forget a shard (e.g. a corrupt one) so the next run recomputes it."""
        for path in (self._marker_path(ref, shard), self.shard_path(ref, shard), self.manifest_path(ref)):
            if self.fs.exists(path):
                self.fs.rm(path)

    def clean(self, ref: str) -> None:
        """Drop a committed intermediate's shards (an ingest `parsed` table doubles the corpus on disk),
        keeping its manifest, flagged `cleaned`: its lineage stays readable, its rows are gone. The flag is
        written first,
        so an interrupted clean leaves no artifact that claims shards it lacks."""
        manifest = self.manifest(ref)
        write_json(self.fs, self.manifest_path(ref), {**manifest, "cleaned": True})
        for m in self.markers(ref):
            for path in (self.shard_path(ref, m["shard"]), self._marker_path(ref, m["shard"])):
                if self.fs.exists(path):
                    self.fs.rm(path)

    # ---- artifacts -----------------------------------------------------------------------
    def manifest_path(self, ref: str) -> str:
        return f"{self.artifact_dir(ref)}/_MANIFEST.json"

    def is_committed(self, ref: str) -> bool:
        return self.fs.exists(self.manifest_path(ref))

    def manifest(self, ref: str) -> dict:
        if not self.is_committed(ref):
            raise MissingArtifactError(f"artifact {ref} is not committed in {self.uri}")
        return read_json(self.fs, self.manifest_path(ref))

    def commit(self, ref: str, lineage: dict, expected_shards: int | None = None) -> dict:
        """Seal an artifact: checks every shard is present and records lineage + checksum."""
        markers = self.markers(ref)
        shards = [m["shard"] for m in markers]
        if expected_shards is not None and sorted(shards) != list(range(expected_shards)):
            missing = sorted(set(range(expected_shards)) - set(shards))
            raise MissingArtifactError(f"cannot commit {ref}: shards {missing} are missing")
        files = self._file_entries(ref)
        manifest = {
            "ref": ref,
            **lineage,
            "shards": len(markers),
            "rows": sum(m["rows"] for m in markers),
            "bytes": sum(m["bytes"] for m in markers) + sum(f["bytes"] for f in files),
            "schema": markers[0]["schema"] if markers else None,
            "checksum": sha256_bytes("".join(m["checksum"] for m in markers + files).encode()),
            "shard_checksums": {m["file"]: m["checksum"] for m in markers},
            "files": files,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(self.fs, self.manifest_path(ref), manifest)
        return manifest

    def read_table(self, ref: str, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
        self.manifest(ref)  # raises unless committed: readers never see an unsealed artifact
        shards = [m["shard"] for m in self.markers(ref)]
        tables = [self.read_shard(ref, s, columns=columns, verify=verify) for s in shards]
        if not tables:
            raise MissingArtifactError(f"artifact {ref} has no shards")
        return pa.concat_tables(tables)

    def list_artifacts(self) -> list[str]:
        base = self.path("artifacts")
        if not self.fs.exists(base):
            return []
        refs = []
        for name_dir in self.fs.ls(base, detail=False):
            for fp_dir in self.fs.ls(name_dir, detail=False):
                refs.append(f"{posixpath.basename(name_dir)}/{posixpath.basename(fp_dir)}")
        return sorted(refs)

    # ---- runs and locks ------------------------------------------------------------------
    def run_dir(self, run_id: str) -> str:
        return self.path("runs", run_id)

    def list_runs(self) -> list[str]:
        base = self.path("runs")
        if not self.fs.exists(base):
            return []
        runs = [posixpath.basename(p) for p in self.fs.ls(base, detail=False)]
        return sorted(runs)

    @contextlib.contextmanager
    def lock(self, ref: str, timeout: float = 3600) -> Iterator[None]:
        """Serialize work on one artifact across processes on this host.

        Local stores use an OS file lock. Remote stores have no cross-host lock: there,
        content-addressed folders + atomic shard writes of deterministic content make two
        writers of the same artifact race harmlessly (both write identical bytes).
        """
        if not is_local(self.fs):
            yield
            return
        from filelock import FileLock

        lock_path = self.path("locks", ref.replace("/", "__") + ".lock")
        self.fs.makedirs(posixpath.dirname(lock_path), exist_ok=True)
        with FileLock(lock_path, timeout=timeout):
            yield
