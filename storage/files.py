"""An artifact's non-tabular files (tokenizers, model folders, tensors, plots) under `_files/`.

A mixin of `ArtifactStore`, its own module because files are streamed and copied, not read as tables."""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tracecore.storage.fs import (
    TEMP_PREFIX,
    atomic_write_bytes,
    file_checksum,
    file_stamp,
    is_local,
    is_temporary,
    safe_join,
)

FILES_DIR = "_files"  # leading underscore: pyarrow.dataset / pandas skip it when reading the folder


class ArtifactFiles:
    """File methods of `ArtifactStore` (it provides `fs`, `artifact_dir`)."""

    def _stamp(self, path: str) -> str | None:
        """A written file's modification stamp, recorded so an integrity check need not read it."""
        stamp = file_stamp(self.fs, path)
        return stamp[1] if stamp else None

    def files_dir(self, ref: str) -> str:
        """Where an artifact's files live: `_files/`, or `files/` in an artifact written before that."""
        base = self.artifact_dir(ref)
        return f"{base}/files" if self.fs.exists(f"{base}/files") else f"{base}/{FILES_DIR}"

    def files_path(self, ref: str) -> str:
        """`files_dir` as a path a user (or a stage reading a sample-world file) can open."""
        path = self.files_dir(ref)
        return path if is_local(self.fs) else self.fs.unstrip_protocol(path)

    def _file_entries(self, ref: str) -> list[dict]:
        base = self.files_dir(ref)
        if not self.fs.exists(base):
            return []
        entries = []
        for path in sorted(self.fs.find(base)):
            if is_temporary(path):
                continue
            entries.append({"file": path[len(base) + 1 :], "bytes": self.fs.size(path),
                            "checksum": file_checksum(self.fs, path), "mtime": self._stamp(path)})
        return entries

    def write_file(self, ref: str, relpath: str, data: bytes) -> None:
        atomic_write_bytes(self.fs, safe_join(self.files_dir(ref), relpath), data)

    def read_file(self, ref: str, relpath: str) -> bytes:
        with self.fs.open(safe_join(self.files_dir(ref), relpath), "rb") as fh:
            return fh.read()

    def put_file(self, ref: str, relpath: str, local_path: str | os.PathLike, move: bool = False) -> None:
        """Stream a local file into the artifact's files (never whole in memory: index tables and model
        weights are GBs): on a local disk a copy to a temporary sibling, then rename; on an object store one
        (multipart) upload, which appears only when complete. `move`: the local file is scratch, so on the
        same local disk it is renamed into place instead of copied (GBs of index written once, not twice)."""
        target = safe_join(self.files_dir(ref), relpath)
        if not is_local(self.fs):
            self.fs.put_file(str(local_path), target)
            return
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if move:
            with contextlib.suppress(OSError):  # another filesystem: copy below
                os.replace(local_path, target)
                return
        tmp = f"{posixpath.dirname(target)}/{TEMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(target)}"
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, target)

    def put_dir(self, ref: str, local_dir: str | os.PathLike) -> None:
        """Copy a local folder (HF tokenizer/model folder) into the artifact's files, file by file,
        streamed."""
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.put_file(ref, path.relative_to(local_dir).as_posix(), path)

    @contextlib.contextmanager
    def local_dir(self, ref: str) -> Iterator[str]:
        """A local folder holding the artifact's files (the folder itself on local stores)."""
        base = self.files_dir(ref)
        if is_local(self.fs):
            yield base
            return
        with tempfile.TemporaryDirectory(prefix="tracecore-") as tmp:
            for path in sorted(self.fs.find(base)):
                if is_temporary(path):
                    continue
                target = Path(tmp) / path[len(base) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(target))  # streamed, not read whole
            yield tmp

    def write_tensors(self, ref: str, relpath: str, tensors: dict) -> None:
        from safetensors.torch import save

        self.write_file(ref, relpath, save({k: v.contiguous() for k, v in tensors.items()}))

    def read_tensors(self, ref: str, relpath: str) -> dict:
        from safetensors.torch import load

        return load(self.read_file(ref, relpath))

