"""Filesystem plumbing: one fsspec filesystem per store root, atomic writes, checksums.

fsspec is used (rather than pyarrow.fs directly) because it understands every URI users
bring (`file://`, `s3://`, `gs://`, `memory://`) and pyarrow reads through it natively.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from pathlib import PurePath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorePathError(ValueError):
    """A path that would leave the store root (`..`, absolute paths)."""


def open_root(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a store root (local path or URI) to (filesystem, root path inside it)."""
    fs, path = fsspec.core.url_to_fs(str(root))
    if not isinstance(fs, LocalFileSystem) and getattr(fs, "dircache", None) is not None:
        # object stores (s3fs, gcsfs) cache directory listings per process; shards and markers are written by
        # other processes (Dask workers, a concurrent run), so a cached listing would hide them
        fs, path = fsspec.core.url_to_fs(str(root), use_listings_cache=False)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def safe_join(root: str, *parts: str) -> str:
    """Join relative parts under root, refusing anything that escapes it."""
    rel = posixpath.normpath(posixpath.join(*parts)) if parts else "."
    if rel == ".." or rel.startswith(("/", "../")):
        raise StorePathError(f"path {posixpath.join(*parts)!r} escapes the store root {root!r}")
    return root if rel == "." else f"{root}/{rel}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_checksum(fs: fsspec.AbstractFileSystem, path: str, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


TEMP_PREFIX = ".tmp-"  # `atomic_write_bytes` writes here first; a writer killed before its rename leaves one


def is_temporary(path: str) -> bool:
    """A file an interrupted write left behind: listings must never read it as data or a marker."""
    return posixpath.basename(path).startswith(TEMP_PREFIX)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a unique temporary sibling, then rename: readers never see a partial file.

    On local disks the rename is atomic (POSIX `rename`). On object stores there is no rename (a move is
    a copy + delete) but an object appears only when its PUT (or multipart upload) completes, so the
    bytes go straight to `path`; completeness is still signalled only by the marker written after the
    data (see `storage.store`).
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{TEMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    try:
        fs.mv(tmp, path)
    except Exception:
        fs.rm(tmp)
        raise


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    atomic_write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


class NoInputError(FileNotFoundError):
    pass


def list_input_files(patterns: list[str], field: str = "ingest.paths") -> list[str]:
    """Expand globs/URIs into a sorted, de-duplicated list of file URIs; `field` names the setting in
    errors."""
    files: list[str] = []
    for pattern in patterns:
        fs, _ = fsspec.core.url_to_fs(pattern)
        matches = fs.glob(fsspec.core.strip_protocol(pattern)) if any(c in pattern for c in "*?[") else (
            [fsspec.core.strip_protocol(pattern)] if fs.exists(pattern) else [])
        matches = [m for m in matches if fs.isfile(m)]
        if not matches:
            raise NoInputError(f"{field}: {pattern!r} matches no files")
        files += [fs.unstrip_protocol(m) for m in sorted(matches)]
    return sorted(dict.fromkeys(files))


def modified(info: dict) -> str | None:
    """A listing's modification stamp, whatever the filesystem calls it (local mtime, S3
    LastModified/ETag)."""
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag")
    return None if stamp is None else str(stamp)


def file_stamp(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str | None] | None:
    """(size, modification stamp) from the listing alone, None when the file is gone: rsync's quick check,
    so deciding that a committed shard is still the one written reads none of its bytes."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return int(info["size"]), modified(info)


def input_fingerprint(files: list[str]) -> str:
    """Identity of the inputs (path, size, modification info): changed files invalidate the stage."""
    digest = hashlib.sha256()
    for uri in files:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
        digest.update(f"{uri}|{info.get('size')}|{modified(info)}".encode())
    return digest.hexdigest()[:16]


def folder_fingerprint(folder: str | PurePath) -> str:
    """Identity of a local folder's files (a user's model): `input_fingerprint` of every file directly in
    it."""
    from pathlib import Path

    return input_fingerprint(sorted(str(f) for f in Path(folder).resolve().glob("*") if f.is_file()))
