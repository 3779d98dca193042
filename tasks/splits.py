"""Input splits for `ingest`: a large file becomes several shards, so a shard's memory is bounded by
`ingest.shard_mb`, not by the size of the file a user happens to have.

* Plain JSONL / JSON lines: byte ranges that end on a line boundary. One sequential pass in the flow
  process finds the boundaries and counts the lines before each (bytes.count, 1 MiB blocks: bounded
  memory), so every shard knows the file line its first record is on and rejects keep exact (file, line).
* Parquet: consecutive row groups whose uncompressed size reaches the bound (the footer says it; nothing
  else is read), with the file row of the first one.
* Compressed files (.gz/.zst/.bz2/.xz) cannot be entered mid-stream and `.txt` is one document: one shard
  each (a compressed file above the bound is logged: split it, or store it uncompressed or as Parquet).

Splits are a pure function of the file's bytes and the bound, so a resumed run plans the same shards.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import fsspec

COMPRESSED = (".gz", ".zst", ".bz2", ".xz")
BLOCK = 1 << 20


def plain_name(uri: str) -> str:
    return PurePosixPath(uri).name.lower()


def plan_splits(uri: str, shard_bytes: int) -> list[dict]:
    """The shards of one input file, in file order."""
    name = plain_name(uri)
    whole = [{"uri": uri, "first_line": 1}]
    if name.endswith(COMPRESSED) or name.endswith(".txt"):
        return whole
    if name.endswith(".parquet"):
        return parquet_splits(uri, shard_bytes)
    with fsspec.open(uri, "rb") as fh:
        size = fh.fs.size(fh.path)
    return whole if size <= shard_bytes else line_splits(uri, shard_bytes)


def line_splits(uri: str, shard_bytes: int) -> list[dict]:
    """Byte ranges of about `shard_bytes`, each ending just after a newline, with their first line number."""
    splits, start, first_line, lines, pos, target = [], 0, 1, 0, 0, shard_bytes
    with fsspec.open(uri, "rb") as fh:
        while block := fh.read(BLOCK):
            cut = 0
            # a boundary falls in this block: the first newline at/after target
            while pos + len(block) > target:
                newline = block.find(b"\n", max(target - pos, cut))
                if newline < 0:
                    break
                lines += block.count(b"\n", cut, newline + 1)
                end = pos + newline + 1
                splits.append({"uri": uri, "start": start, "end": end, "first_line": first_line})
                start, first_line, cut, target = end, first_line + lines, newline + 1, end + shard_bytes
                lines = 0
            lines += block.count(b"\n", cut)
            pos += len(block)
    if pos > start:
        splits.append({"uri": uri, "start": start, "end": pos, "first_line": first_line})
    return splits


def parquet_splits(uri: str, shard_bytes: int) -> list[dict]:
    """Runs of row groups of about `shard_bytes` uncompressed; a file that cannot be read stays one shard
    (its parse reports why, as a reject)."""
    import pyarrow.parquet as pq

    try:
        with fsspec.open(uri, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception:  # noqa: BLE001 - damaged or not Parquet: the parse step rejects it with the reason
        return [{"uri": uri, "first_line": 1}]
    splits, group, size, first_row, row = [], [], 0, 1, 1
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        group.append(i)
        size += rg.total_byte_size
        row += rg.num_rows
        if size >= shard_bytes:
            splits.append({"uri": uri, "row_groups": group, "first_line": first_row})
            group, size, first_row = [], 0, row
    if group or not splits:
        splits.append({"uri": uri, "row_groups": group, "first_line": first_row})
    return splits if len(splits) > 1 else [{"uri": uri, "first_line": 1}]
