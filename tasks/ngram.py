"""Stage `ngram`: corpus n-gram counting — an infini-gram index and an exact small-n table.

* infini-gram index: the package's tokenizer step needs the hub, so we write its on-disk format
  ourselves (`tokenized.0`: each document = 0xFFFF separator + little-endian ids; `offset.0`: u64
  byte offset of each document) and run the package's indexer (`python -m infini_gram.indexing`),
  which then only builds the suffix array. One index per shard group, groups built in parallel on
  Dask, queried together through one `InfiniGramEngine`.
* exact table: map-reduce over token shards. An n-gram of u16 ids (n <= 4) packs losslessly into a
  uint64 key, so "hashing" is exact; keys are bucketed by a mixed hash, counted per partition (map),
  summed per bucket (reduce), and written as Parquet (`ngram`, `n`, `count`) plus a top-k table.
Both are resumable per shard group / partition / bucket.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from configs.schema import NgramConfig
from storage.lineage import code_version, lineage
from storage.store import FILES_DIR, ArtifactStore
from tasks.common import already_committed, get_logger, map_shards, plan_ref, stage_task

SEPARATOR = b"\xff\xff"


class EmptyCorpusError(ValueError):
    pass


class VocabMismatchError(ValueError):
    pass


def plan_ngram(cfg: NgramConfig, tokens_ref: str, tokenizer_ref: str) -> dict[str, str]:
    index = plan_ref("ngram_index", "ngram", cfg.fingerprint(), {"tokens": tokens_ref, "tokenizer": tokenizer_ref},
                     __name__)
    fp = index.split("/")[1]
    return {"index": index, "counts_map": f"ngram_map/{fp}", "counts": f"ngram_counts/{fp}",
            "topk": f"ngram_topk/{fp}"}


def id_bits(store: ArtifactStore, tokens_ref: str) -> int:
    return 16 if "uint16" in store.markers(tokens_ref)[0]["schema"] else 32


def check_inputs(store: ArtifactStore, cfg: NgramConfig, tokens_ref: str, vocab_size: int) -> int:
    """Fail before any work: empty corpus, ids that do not fit the index, n too large to pack."""
    manifest = store.manifest(tokens_ref)
    if not manifest.get("tokens"):
        raise EmptyCorpusError(f"ngram: the token artifact {tokens_ref} holds no tokens (empty corpus)")
    bits = id_bits(store, tokens_ref)
    if bits == 32:
        raise VocabMismatchError(f"ngram: tokens in {tokens_ref} are uint32 (vocab {vocab_size}); the infini-gram "
                                 "index here is built with u16 ids: use a tokenizer with vocab <= 65535")
    if vocab_size > 65_535:
        raise VocabMismatchError(f"ngram: tokenizer vocab {vocab_size} exceeds 65535, the u16 index limit")
    if cfg.max_n * bits > 64:
        raise ValueError(f"ngram.max_n={cfg.max_n} cannot be packed with {bits}-bit ids (max {64 // bits})")
    return bits


# ---- infini-gram index ------------------------------------------------------------------------
def group_shards(n_shards: int, groups: int) -> list[list[int]]:
    """Contiguous token shards per index group (document order is kept)."""
    groups = max(1, min(groups, n_shards))
    return [list(part) for part in np.array_split(np.arange(n_shards), groups) if len(part)]


def write_infinigram_files(store: ArtifactStore, tokens_ref: str, shards: list[int], vocab_size: int,
                           out: Path) -> tuple[int, int]:
    """Write `tokenized.0` / `offset.0` for these shards; returns (documents, tokens)."""
    docs = tokens = 0
    with open(out / "tokenized.0", "wb") as data, open(out / "offset.0", "wb") as offsets:
        for shard in shards:
            column = store.read_shard(tokens_ref, shard, columns=["tokens"]).column(0)
            for ids in column.to_numpy(zero_copy_only=False):
                ids = np.asarray(ids, dtype=np.uint16)
                if ids.size and int(ids.max()) >= vocab_size:
                    raise VocabMismatchError(f"ngram: token id {int(ids.max())} in shard {shard} of {tokens_ref} "
                                             f">= tokenizer vocab {vocab_size}")
                offsets.write(np.uint64(data.tell()).tobytes())
                data.write(SEPARATOR + ids.astype("<u2").tobytes())
                docs, tokens = docs + 1, tokens + ids.size
    return docs, tokens


def run_indexer(folder: Path, mem_gib: int, cpus: int) -> None:
    """The package's indexer; tokenization is skipped because tokenized.0/offset.0 already exist."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ulimit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    cmd = [sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(folder), "--save_dir", str(folder),
           "--temp_dir", str(folder / "tmp"), "--token_dtype", "u16", "--mem", str(mem_gib), "--cpus", str(cpus),
           "--ulimit", str(ulimit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (folder / "table.0").exists():
        raise RuntimeError(f"infini-gram indexer failed in {folder}: {proc.stdout[-500:]} {proc.stderr[-1000:]}")


def build_index_group(store_uri: str, ref: str, group: int, item: tuple, mem_gib: int, cpus: int) -> dict:
    store = ArtifactStore(store_uri)
    tokens_ref, tokenizer_ref, shards, vocab_size = item
    with tempfile.TemporaryDirectory(prefix="tracecore-igram-") as tmp:
        folder = Path(tmp)
        docs, tokens = write_infinigram_files(store, tokens_ref, shards, vocab_size, folder)
        # The indexer splits the work in `cpus` parts only when the group is large enough.
        run_indexer(folder, mem_gib, cpus if tokens * 2 >= cpus * 200_000 else 1)
        for name in ("tokenized.0", "offset.0", "table.0"):
            store.write_file(ref, f"group-{group:03d}/{name}", (folder / name).read_bytes())
    summary = pa.table({"group": [group], "folder": [f"{FILES_DIR}/group-{group:03d}"], "token_shards": [shards],
                        "documents": [docs], "tokens": [tokens], "tokenizer": [tokenizer_ref],
                        "vocab_size": [vocab_size], "token_dtype": ["u16"]})
    return store.write_shard(ref, group, summary, documents=docs, tokens=tokens)


@contextlib.contextmanager
def open_engine(store: ArtifactStore, index_ref: str, max_clause_freq: int = 50_000,
                max_diff_tokens: int = 100) -> Iterator:
    """An `InfiniGramEngine` over every shard group of the index (memory-mapped from local files)."""
    from infini_gram.engine import InfiniGramEngine

    manifest = store.manifest(index_ref)
    with store.local_dir(index_ref) as folder:
        dirs = sorted(str(p) for p in Path(folder).glob("group-*"))
        yield InfiniGramEngine(index_dir=dirs, eos_token_id=manifest["eos_token_id"], vocab_size=65535,
                               version=4, token_dtype="u16", max_clause_freq=max_clause_freq,
                               max_diff_tokens=max_diff_tokens)


# ---- exact n-gram table ------------------------------------------------------------------------
def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads packed keys evenly over buckets."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def packed_ngrams(docs: list[np.ndarray], n: int, bits: int = 16) -> np.ndarray:
    """uint64 keys of every n-gram that lies inside one document: id_0 | id_1 << bits | ..."""
    flat = np.concatenate(docs).astype(np.uint64) if docs else np.zeros(0, np.uint64)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    if len(flat) < n:
        return np.zeros(0, np.uint64)
    m = len(flat) - n + 1
    keys = np.zeros(m, np.uint64)
    for k in range(n):
        keys |= flat[k:k + m] << np.uint64(bits * k)
    return keys[doc_of[:m] == doc_of[n - 1:n - 1 + m]]


def unpack(keys: np.ndarray, n: int, bits: int = 16) -> list[list[int]]:
    mask = np.uint64((1 << bits) - 1)
    cols = [((keys >> np.uint64(bits * k)) & mask).astype(np.int64) for k in range(n)]
    return np.stack(cols, axis=1).tolist() if len(keys) else []


def count_partition(store_uri: str, ref: str, shard: int, item: tuple, max_n: int, buckets: int) -> dict:
    """Map: distinct n-grams of one token shard with their counts, tagged with their bucket."""
    store = ArtifactStore(store_uri)
    tokens_ref = item
    column = store.read_shard(tokens_ref, shard, columns=["tokens"]).column(0)
    docs = [np.asarray(d, dtype=np.uint64) for d in column.to_numpy(zero_copy_only=False)]
    parts = []
    for n in range(1, max_n + 1):
        keys, counts = np.unique(packed_ngrams(docs, n), return_counts=True)
        bucket = (mix64(keys ^ np.uint64(n * 0x9E3779B97F4A7C15 % (1 << 64))) % np.uint64(buckets)).astype(np.uint16)
        parts.append(pa.table({"bucket": bucket, "n": np.full(len(keys), n, np.uint8), "key": keys,
                               "count": counts.astype(np.uint64)}))
    table = pa.concat_tables(parts).sort_by([("bucket", "ascending"), ("n", "ascending"), ("key", "ascending")])
    return store.write_shard(ref, shard, table)


def reduce_bucket(store_uri: str, ref: str, bucket: int, item: tuple) -> dict:
    """Reduce: sum one bucket's counts over all partitions; decode keys back to id lists."""
    store = ArtifactStore(store_uri)
    map_ref, n_partitions = item
    pieces = []
    for shard in range(n_partitions):
        table = store.read_shard(map_ref, shard)
        pieces.append(table.filter(pc.equal(table["bucket"], bucket)))
    summed = pa.concat_tables(pieces).group_by(["n", "key"]).aggregate([("count", "sum")])
    out = []
    for n in sorted(set(summed["n"].to_pylist())):
        part = summed.filter(pc.equal(summed["n"], n)).sort_by([("count_sum", "descending"), ("key", "ascending")])
        keys = part["key"].to_numpy()
        out.append(pa.table({"ngram": pa.array(unpack(keys, n), type=pa.list_(pa.uint16())),
                             "n": part["n"].cast(pa.uint8()), "count": part["count_sum"].cast(pa.uint64())}))
    schema = pa.schema([("ngram", pa.list_(pa.uint16())), ("n", pa.uint8()), ("count", pa.uint64())])
    table = pa.concat_tables(out) if out else schema.empty_table()
    return store.write_shard(ref, bucket, table)


def top_k_table(store: ArtifactStore, counts_ref: str, buckets: int, k: int, tokenizer) -> pa.Table:
    rows = []
    tables = [store.read_shard(counts_ref, b) for b in range(buckets)]
    table = pa.concat_tables(tables)
    for n in sorted(set(table["n"].to_pylist())):
        part = table.filter(pc.equal(table["n"], n)).sort_by([("count", "descending")]).slice(0, k)
        for rank, row in enumerate(part.to_pylist(), start=1):
            rows.append({**row, "rank": rank, "text": tokenizer.decode(row["ngram"])})
    return pa.Table.from_pylist(rows)


def run_ngram(store_uri: str, cfg: NgramConfig, tokens_ref: str, tokenizer_ref: str, refs: dict[str, str],
              address: str | None = None) -> dict[str, str]:
    from transformers import AutoTokenizer

    store, log = ArtifactStore(store_uri), get_logger()
    with store.lock(refs["index"]):
        if already_committed(store, "ngram", refs["topk"]):
            return refs
        with store.local_dir(tokenizer_ref) as folder:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        check_inputs(store, cfg, tokens_ref, len(tokenizer))
        record = lineage("ngram", cfg.fingerprint(), {"tokens": tokens_ref, "tokenizer": tokenizer_ref},
                         code_version(__name__))
        n_shards = store.manifest(tokens_ref)["shards"]
        groups = group_shards(n_shards, cfg.shard_groups)
        index = map_shards("ngram-index", store, refs["index"], build_index_group,
                           [(tokens_ref, tokenizer_ref, g, len(tokenizer)) for g in groups], address,
                           mem_gib=cfg.index_mem_gib, cpus=cfg.index_cpus)
        index_tokens = index.sum_computed("tokens")
        store.commit(refs["index"], {**record, "tokenizer": tokenizer_ref, "vocab_size": len(tokenizer),
                                     "eos_token_id": tokenizer.eos_token_id, "token_dtype": "u16",
                                     "tokens": sum(m["tokens"] for m in index.markers),
                                     "documents": sum(m["documents"] for m in index.markers),
                                     "seconds": index.seconds, "skipped_shards": index.skipped,
                                     "tokens_per_second": round(index_tokens / index.seconds, 1) if index.computed else None},
                     expected_shards=len(groups))
        mapped = map_shards("ngram-map", store, refs["counts_map"], count_partition, [tokens_ref] * n_shards,
                            address, max_n=cfg.max_n, buckets=cfg.buckets)
        store.commit(refs["counts_map"], record, expected_shards=n_shards)
        reduced = map_shards("ngram-reduce", store, refs["counts"], reduce_bucket,
                             [(refs["counts_map"], n_shards)] * cfg.buckets, address)
        store.commit(refs["counts"], {**record, "max_n": cfg.max_n, "buckets": cfg.buckets,
                                      "seconds": mapped.seconds + reduced.seconds,
                                      "skipped_shards": mapped.skipped + reduced.skipped},
                     expected_shards=cfg.buckets)
        store.write_shard(refs["topk"], 0, top_k_table(store, refs["counts"], cfg.buckets, cfg.top_k, tokenizer))
        store.commit(refs["topk"], {**record, "top_k": cfg.top_k}, expected_shards=1)
        log.info("ngram: index of %d tokens in %d groups; exact table n<=%d in %d buckets", index_tokens,
                 len(groups), cfg.max_n, cfg.buckets)
    return refs


ngram_task = stage_task(run_ngram, "ngram")
