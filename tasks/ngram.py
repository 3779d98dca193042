"""Stage `ngram`: corpus n-gram counting — an infini-gram index and an exact small-n table.

* infini-gram index: the package's tokenizer step needs the hub, so we write its on-disk format
  ourselves (`tokenized.0`: each document = 0xFFFF separator + little-endian ids; `offset.0`: u64
  byte offset of each document) and run the package's indexer (`python -m infini_gram.indexing`),
  which then only builds the suffix array. One index per shard group, groups built in parallel on
  Dask, queried together through one `InfiniGramEngine`.
* exact table: map-reduce over token shards. An n-gram packs losslessly into a two-word key (`key0`,
  `key1`: 128 bits, so n <= 8 with u16 ids and n <= 4 with u32 ids), so "hashing" is exact; keys are
  bucketed by a mixed hash, counted per partition (map), summed per bucket (reduce), and written as
  Parquet (`ngram`, `n`, `count`) plus a top-k table.
* ids: u16 when the tokenizer has <= 65,535 tokens, else u32 (Llama 3, Qwen 2, Gemma): token shards and the
  exact table hold u32 ids; the index holds each id as two u16 symbols (`PairedEngine`), because
  infini-gram 2.6's own u32 suffix-array builder allocates 2^32 x 8 bytes (32 GiB) per job (measured:
  "memory allocation of 34359738368 bytes failed" on a 40-document corpus), more than a CI machine has.
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
from tracecore.configs.schema import NgramConfig
from tracecore.storage.store import FILES_DIR, ArtifactStore
from tracecore.tasks.common import map_shards
from tracecore.tasks.stage import Stage, StageRun


class EmptyCorpusError(ValueError):
    pass


class VocabMismatchError(ValueError):
    pass


KEY_WORDS = 2  # 64-bit words per packed n-gram key


def id_bits(store: ArtifactStore, tokens_ref: str) -> int:
    return 16 if "uint16" in store.markers(tokens_ref)[0]["schema"] else 32


SEPARATOR = b"\xff\xff"  # infini-gram's u16 document separator (the all-ones id)
HALF = 32_767  # paired symbols: lo = id % HALF in [0, HALF), hi = HALF + id // HALF in [HALF, 65535)
MAX_PAIRED_ID = HALF * (0xFFFF - HALF) - 1


def token_dtype(bits: int) -> str:
    return {16: "u16", 32: "u32"}[bits]


def to_symbols(ids: np.ndarray) -> np.ndarray:
    """u32 ids -> u16 symbols, two per id (hi, lo). hi and lo come from disjoint ranges, so a match of an
    encoded query can only start at a hi symbol, i.e. on a token boundary: counts stay exact."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty(2 * len(ids), np.uint16)
    out[0::2], out[1::2] = HALF + ids // HALF, ids % HALF
    return out


class PairedEngine:
    """The engine API tracecore uses (`count`, `count_cnf`, `infgram_prob`) over an index of paired symbols."""

    def __init__(self, engine):
        self.engine = engine

    def encode(self, ids) -> list[int]:
        """Token ids -> the index's symbols (what the raw engine's `find` and ranks work in)."""
        return to_symbols(ids).tolist()

    def count(self, input_ids) -> dict:
        return self.engine.count(self.encode(input_ids))

    def count_cnf(self, cnf, max_clause_freq=None, max_diff_tokens=None) -> dict:
        diff = None if max_diff_tokens is None else 2 * max_diff_tokens  # two symbols per token
        return self.engine.count_cnf([[self.encode(t) for t in clause] for clause in cnf], max_clause_freq, diff)

    def infgram_prob(self, prompt_ids, cont_id: int) -> dict:
        """cnt(s + t) / cnt(s) for the longest suffix s of the prompt that occurs (infini-gram's definition);
        a count is monotone in the suffix length, so the longest one is found by bisection."""
        lo, hi = 0, len(prompt_ids)  # suffix length lo is known to occur (the empty one always does)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.count(prompt_ids[len(prompt_ids) - mid:])["count"] else (lo, mid - 1)
        suffix = list(prompt_ids[len(prompt_ids) - lo:])
        prompt_cnt = self.count(suffix)["count"] if suffix else self.engine.count([])["count"] // 2
        cont_cnt = self.count(suffix + [cont_id])["count"]
        return {"prompt_cnt": prompt_cnt, "cont_cnt": cont_cnt, "prob": cont_cnt / max(prompt_cnt, 1),
                "suffix_len": lo}


def check_inputs(store: ArtifactStore, cfg: NgramConfig, tokens_ref: str, vocab_size: int) -> int:
    """Fail before any work: empty corpus, ids that do not fit, n too large to pack."""
    manifest = store.manifest(tokens_ref)
    if not manifest.get("tokens"):
        raise EmptyCorpusError(f"ngram: the token artifact {tokens_ref} holds no tokens (empty corpus)")
    bits = id_bits(store, tokens_ref)
    if vocab_size > (0xFFFF if bits == 16 else MAX_PAIRED_ID + 1):  # 0xFFFF is the document separator
        raise VocabMismatchError(f"ngram: tokenizer vocab {vocab_size} does not fit the {bits}-bit ids of "
                                 f"{tokens_ref}; re-run tokenize with this tokenizer")
    if cfg.max_n * bits > 64 * KEY_WORDS:
        raise ValueError(f"ngram.max_n={cfg.max_n} cannot be packed exactly with {bits}-bit ids "
                         f"(max {64 * KEY_WORDS // bits})")
    return bits


# ---- infini-gram index ------------------------------------------------------------------------
def group_shards(n_shards: int, groups: int) -> list[list[int]]:
    """Contiguous token shards per index group (document order is kept)."""
    groups = max(1, min(groups, n_shards))
    return [list(part) for part in np.array_split(np.arange(n_shards), groups) if len(part)]


def write_infinigram_files(store: ArtifactStore, tokens_ref: str, shards: list[int], vocab_size: int,
                           out: Path, bits: int = 16) -> tuple[int, int]:
    """Write `tokenized.0` / `offset.0` for these shards; returns (documents, tokens)."""
    docs = tokens = 0
    with open(out / "tokenized.0", "wb") as data, open(out / "offset.0", "wb") as offsets:
        for shard in shards:
            column = store.read_shard(tokens_ref, shard, columns=["tokens"]).column(0)
            for ids in column.to_numpy(zero_copy_only=False):
                ids = np.asarray(ids, dtype=np.uint16 if bits == 16 else np.uint32)
                if ids.size and int(ids.max()) >= vocab_size:
                    raise VocabMismatchError(f"ngram: token id {int(ids.max())} in shard {shard} of {tokens_ref} "
                                             f">= tokenizer vocab {vocab_size}")
                offsets.write(np.uint64(data.tell()).tobytes())
                symbols = ids if bits == 16 else to_symbols(ids)
                data.write(SEPARATOR + symbols.astype("<u2").tobytes())
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
    bits = id_bits(store, tokens_ref)
    with tempfile.TemporaryDirectory(prefix="tracecore-igram-") as tmp:
        folder = Path(tmp)
        docs, tokens = write_infinigram_files(store, tokens_ref, shards, vocab_size, folder, bits)
        # The indexer splits the work in `cpus` parts only when the group is large enough.
        run_indexer(folder, mem_gib, cpus if tokens * 2 >= cpus * 200_000 else 1)
        for name in ("tokenized.0", "offset.0", "table.0"):
            store.put_file(ref, f"group-{group:03d}/{name}", folder / name)  # streamed: index files are GBs
    summary = pa.table({"group": [group], "folder": [f"{FILES_DIR}/group-{group:03d}"], "token_shards": [shards],
                        "documents": [docs], "tokens": [tokens], "tokenizer": [tokenizer_ref],
                        "vocab_size": [vocab_size], "token_dtype": [token_dtype(bits)]})
    return store.write_shard(ref, group, summary, documents=docs, tokens=tokens)


@contextlib.contextmanager
def open_engine(store: ArtifactStore, index_ref: str, max_clause_freq: int = 50_000,
                max_diff_tokens: int = 100) -> Iterator:
    """An `InfiniGramEngine` over every shard group of the index (memory-mapped from local files)."""
    from infini_gram.engine import InfiniGramEngine

    manifest = store.manifest(index_ref)
    with store.local_dir(index_ref) as folder:
        dirs = sorted(str(p) for p in Path(folder).glob("group-*"))
        paired = manifest.get("token_dtype", "u16") == "u32"
        eos = manifest["eos_token_id"]
        engine = InfiniGramEngine(index_dir=dirs, eos_token_id=to_symbols([eos])[0].item() if paired else eos,
                                  vocab_size=65535, version=4, token_dtype="u16", max_clause_freq=max_clause_freq,
                                  max_diff_tokens=2 * max_diff_tokens if paired else max_diff_tokens)
        yield PairedEngine(engine) if paired else engine


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
    """[m, KEY_WORDS] uint64 keys of every n-gram that lies inside one document: id k sits at bit bits*k of
    the 128-bit key (64 is a multiple of bits, so no id straddles two words)."""
    flat = np.concatenate(docs).astype(np.uint64) if docs else np.zeros(0, np.uint64)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    if len(flat) < n:
        return np.zeros((0, KEY_WORDS), np.uint64)
    m = len(flat) - n + 1
    keys = np.zeros((m, KEY_WORDS), np.uint64)
    for k in range(n):
        word, shift = divmod(bits * k, 64)
        keys[:, word] |= flat[k:k + m] << np.uint64(shift)
    return keys[doc_of[:m] == doc_of[n - 1:n - 1 + m]]


def unpack(keys: np.ndarray, n: int, bits: int = 16) -> list[list[int]]:
    """Id lists of [m, KEY_WORDS] keys (the inverse of `packed_ngrams`)."""
    mask = np.uint64((1 << bits) - 1)
    cols = [((keys[:, (bits * k) // 64] >> np.uint64((bits * k) % 64)) & mask).astype(np.int64) for k in range(n)]
    return np.stack(cols, axis=1).tolist() if len(keys) else []


def bucket_of(keys: np.ndarray, n: int, buckets: int) -> np.ndarray:
    """A mixed hash of both key words and n, so buckets get even shares; exact grouping uses the keys."""
    mixed = mix64(keys[:, 0] ^ np.uint64(n * 0x9E3779B97F4A7C15 % (1 << 64)))
    return (mix64(mixed ^ keys[:, 1]) % np.uint64(buckets)).astype(np.uint16)


def count_partition(store_uri: str, ref: str, shard: int, item: tuple, max_n: int, buckets: int) -> dict:
    """Map: distinct n-grams of one token shard with their counts, tagged with their bucket."""
    store = ArtifactStore(store_uri)
    tokens_ref = item
    column = store.read_shard(tokens_ref, shard, columns=["tokens"]).column(0)
    bits = id_bits(store, tokens_ref)
    docs = [np.asarray(d, dtype=np.uint64) for d in column.to_numpy(zero_copy_only=False)]
    parts = []
    for n in range(1, max_n + 1):
        keys, counts = np.unique(packed_ngrams(docs, n, bits), axis=0, return_counts=True)
        parts.append(pa.table({"bucket": bucket_of(keys, n, buckets), "n": np.full(len(keys), n, np.uint8),
                               "key0": keys[:, 0], "key1": keys[:, 1], "count": counts.astype(np.uint64)}))
    order = [("bucket", "ascending"), ("n", "ascending"), ("key0", "ascending"), ("key1", "ascending")]
    table = pa.concat_tables(parts).sort_by(order)
    return store.write_shard(ref, shard, table)


def reduce_bucket(store_uri: str, ref: str, bucket: int, item: tuple) -> dict:
    """Reduce: sum one bucket's counts over all partitions; decode keys back to id lists."""
    store = ArtifactStore(store_uri)
    map_ref, n_partitions, bits = item
    pieces = []
    for shard in range(n_partitions):
        table = store.read_shard(map_ref, shard)
        pieces.append(table.filter(pc.equal(table["bucket"], bucket)))
    summed = pa.concat_tables(pieces).group_by(["n", "key0", "key1"]).aggregate([("count", "sum")])
    id_type = pa.uint16() if bits == 16 else pa.uint32()
    out = []
    for n in sorted(set(summed["n"].to_pylist())):
        part = summed.filter(pc.equal(summed["n"], n)).sort_by([("count_sum", "descending"), ("key0", "ascending"),
                                                                ("key1", "ascending")])
        keys = np.stack([part["key0"].to_numpy(), part["key1"].to_numpy()], axis=1)
        out.append(pa.table({"ngram": pa.array(unpack(keys, n, bits), type=pa.list_(id_type)),
                             "n": part["n"].cast(pa.uint8()), "count": part["count_sum"].cast(pa.uint64())}))
    schema = pa.schema([("ngram", pa.list_(id_type)), ("n", pa.uint8()), ("count", pa.uint64())])
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


def run_ngram(run: StageRun) -> None:
    from transformers import AutoTokenizer

    store, cfg, log = run.store, run.cfg, run.log
    tokens_ref, tokenizer_ref = run.inputs["tokens"], run.inputs["tokenizer"]
    with store.local_dir(tokenizer_ref) as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    bits = check_inputs(store, cfg, tokens_ref, len(tokenizer))
    n_shards = store.manifest(tokens_ref)["shards"]
    groups = group_shards(n_shards, cfg.shard_groups)
    index = map_shards("ngram-index", store, run.ref("index"), build_index_group,
                       [(tokens_ref, tokenizer_ref, g, len(tokenizer)) for g in groups], run.address,
                       mem_gib=cfg.index_mem_gib, cpus=cfg.index_cpus)
    index_tokens = index.sum_computed("tokens")
    run.commit("index", {"tokenizer": tokenizer_ref, "vocab_size": len(tokenizer),
                         "eos_token_id": tokenizer.eos_token_id, "token_dtype": token_dtype(bits),
                         "tokens": sum(m["tokens"] for m in index.markers),
                         "documents": sum(m["documents"] for m in index.markers),
                         "seconds": index.seconds, "skipped_shards": index.skipped,
                         "tokens_per_second": round(index_tokens / index.seconds, 1) if index.computed else None},
               expected_shards=len(groups))
    mapped = map_shards("ngram-map", store, run.ref("counts_map"), count_partition, [tokens_ref] * n_shards,
                        run.address, max_n=cfg.max_n, buckets=cfg.buckets)
    run.commit("counts_map", expected_shards=n_shards)
    reduced = map_shards("ngram-reduce", store, run.ref("counts"), reduce_bucket,
                         [(run.ref("counts_map"), n_shards, bits)] * cfg.buckets, run.address)
    run.commit("counts", {"max_n": cfg.max_n, "buckets": cfg.buckets, "seconds": mapped.seconds + reduced.seconds,
                          "skipped_shards": mapped.skipped + reduced.skipped}, expected_shards=cfg.buckets)
    store.write_shard(run.ref("topk"), 0, top_k_table(store, run.ref("counts"), cfg.buckets, cfg.top_k, tokenizer))
    run.commit("topk", {"top_k": cfg.top_k}, expected_shards=1)
    log.info("ngram: index of %d tokens in %d groups; exact table n<=%d in %d buckets", index_tokens,
             len(groups), cfg.max_n, cfg.buckets)


STAGE = Stage("ngram", NgramConfig, {"topk": "ngram_topk", "index": "ngram_index", "counts_map": "ngram_map",
                                     "counts": "ngram_counts"}, run_ngram,
              needs={"tokens": "tokenize.tokens", "tokenizer": "tokenize.tokenizer"},
              description="infini-gram index + exact n-gram tables over the token shards")
