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


def flat_ids(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(every id of the column in order, document bounds [0, end_0, end_1, ...]) without per-document copies;
    `flatten` honours a sliced column, whose offsets need not start at 0."""
    offsets = column.offsets.to_numpy().astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


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
def group_shards(shard_tokens: list[int], groups: int, group_tokens: int) -> list[list[int]]:
    """Contiguous token shards per index group (document order is kept): at least `groups` groups when there
    are enough shards, and at most `group_tokens` tokens per group unless one shard is larger, so the
    indexer's memory (~20 bytes per token of its group, measured) does not grow with the corpus."""
    target = min(-(-sum(shard_tokens) // max(1, groups)), group_tokens)
    out: list[list[int]] = []
    size = 0
    for shard, tokens in enumerate(shard_tokens):
        if not out or (size + tokens > target and out[-1]):
            out.append([])
            size = 0
        out[-1].append(shard)
        size += tokens
    return out


def write_infinigram_files(store: ArtifactStore, tokens_ref: str, shards: list[int], vocab_size: int,
                           out: Path, bits: int = 16) -> tuple[int, int]:
    """Write `tokenized.0` / `offset.0` for these shards, one shard at a time and vectorized (a separator
    before each document's symbols); returns (documents, tokens)."""
    docs = tokens = written = 0
    with open(out / "tokenized.0", "wb") as data, open(out / "offset.0", "wb") as offsets:
        for shard in shards:
            column = store.read_shard(tokens_ref, shard, columns=["tokens"]).column(0).combine_chunks()
            ids, bounds = flat_ids(column)
            if ids.size and int(ids.max()) >= vocab_size:
                raise VocabMismatchError(f"ngram: token id {int(ids.max())} in shard {shard} of {tokens_ref} "
                                         f">= tokenizer vocab {vocab_size}")
            symbols = (ids.astype(np.uint16) if bits == 16 else to_symbols(ids)).astype("<u2")
            width = 1 if bits == 16 else 2  # symbols per id
            starts = bounds[:-1] * width + np.arange(len(column))  # where each document's separator goes
            buffer = np.empty(symbols.size + len(column), "<u2")
            is_separator = np.zeros(buffer.size, bool)
            is_separator[starts] = True
            buffer[is_separator], buffer[~is_separator] = 0xFFFF, symbols
            offsets.write((written + 2 * starts).astype("<u8").tobytes())
            data.write(buffer.tobytes())
            written += 2 * buffer.size
            docs, tokens = docs + len(column), tokens + ids.size
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
            store.put_file(ref, f"group-{group:03d}/{name}", folder / name, move=True)  # streamed: GBs
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
    return packed_flat(flat, np.cumsum([len(d) for d in docs]), n, bits)


def packed_flat(flat: np.ndarray, ends: np.ndarray, n: int, bits: int = 16) -> np.ndarray:
    """`packed_ngrams` over the concatenated ids and each document's end offset (an Arrow list column's)."""
    if len(flat) < n:
        return np.zeros((0, KEY_WORDS), np.uint64)
    m = len(flat) - n + 1
    keys = np.zeros((m, KEY_WORDS), np.uint64)
    for k in range(n):
        word, shift = divmod(bits * k, 64)
        keys[:, word] |= flat[k:k + m].astype(np.uint64) << np.uint64(shift)
    crosses = np.zeros(m, bool)  # an n-gram starting at e - j (0 < j < n) spans the end e of a document
    for j in range(1, n):
        starts = np.asarray(ends, np.int64) - j
        crosses[starts[(starts >= 0) & (starts < m)]] = True
    return keys[~crosses]


def unpacked_ids(keys: np.ndarray, n: int, bits: int = 16) -> np.ndarray:
    """[m, n] ids of [m, KEY_WORDS] keys (the inverse of `packed_ngrams`), vectorized."""
    mask = np.uint64((1 << bits) - 1)
    cols = [(keys[:, (bits * k) // 64] >> np.uint64((bits * k) % 64)) & mask for k in range(n)]
    return np.stack(cols, axis=1) if len(keys) else np.zeros((0, n), np.uint64)


def unpack(keys: np.ndarray, n: int, bits: int = 16) -> list[list[int]]:
    return unpacked_ids(keys, n, bits).astype(np.int64).tolist()


def bucket_of(keys: np.ndarray, n: int, buckets: int) -> np.ndarray:
    """A mixed hash of both key words and n, so buckets get even shares; exact grouping uses the keys."""
    mixed = mix64(keys[:, 0] ^ np.uint64(n * 0x9E3779B97F4A7C15 % (1 << 64)))
    return (mix64(mixed ^ keys[:, 1]) % np.uint64(buckets)).astype(np.uint16)


def bucket_count(cfg: NgramConfig, tokens: int) -> int:
    """At least `buckets`, one more per `bucket_tokens`: a reduce task holds ~1/buckets of the distinct n-grams,
    so its memory does not grow with the corpus (uint16 bucket ids: at most 65,535)."""
    return min(65_535, max(cfg.buckets, -(-tokens // cfg.bucket_tokens)))


def one_word(keys: np.ndarray) -> bool:
    """Every key fits the first word (n-grams of u16 ids with n <= 4): 1-D sorts suffice."""
    return not keys[:, 1:].any()


def distinct_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct [m, KEY_WORDS] keys in key order, uint64 occurrence counts): np.unique's sort, in place."""
    if one_word(keys):
        first, counts = np.unique(keys[:, 0], return_counts=True)
        out = np.zeros((len(first), keys.shape[1]), np.uint64)
        out[:, 0] = first
        return out, counts.astype(np.uint64)
    distinct, counts = np.unique(keys, axis=0, return_counts=True)
    return distinct, counts.astype(np.uint64)


def sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys in key order, summed uint64 counts): one sort, then exact integer sums per run."""
    if not len(keys):
        return keys, counts.astype(np.uint64)
    order = np.argsort(keys[:, 0]) if one_word(keys) else np.lexsort(keys.T[::-1])
    keys, counts = keys[order], counts[order].astype(np.uint64)
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
    return keys[starts], np.add.reduceat(counts, starts)


def count_partition(store_uri: str, ref: str, shard: int, item: tuple, max_n: int, buckets: int) -> dict:
    """Map: distinct n-grams of one token shard with their counts, rows ordered by bucket, one Parquet row
    group per bucket (a reduce task then reads only its own)."""
    store = ArtifactStore(store_uri)
    tokens_ref = item
    column = store.read_shard(tokens_ref, shard, columns=["tokens"]).column(0).combine_chunks()
    bits = id_bits(store, tokens_ref)
    flat, bounds = flat_ids(column)
    parts = []
    for n in range(1, max_n + 1):
        keys, counts = distinct_keys(packed_flat(flat, bounds[1:], n, bits))
        parts.append((bucket_of(keys, n, buckets), np.full(len(keys), n, np.uint8), keys, counts))
    bucket, n_col, keys, counts = (np.concatenate(c) for c in zip(*parts))
    order = np.argsort(bucket, kind="stable")  # radix sort of uint16; keeps (n, key) order within a bucket
    table = pa.table({"bucket": bucket[order], "n": n_col[order], "key0": keys[order, 0], "key1": keys[order, 1],
                      "count": counts[order]})
    return store.write_shard(ref, shard, table, row_groups_by="bucket")


def reduce_bucket(store_uri: str, ref: str, bucket: int, item: tuple) -> dict:
    """Reduce: sum one bucket's counts over all partitions, each n ordered by count; keys decoded to ids.
    Map partitions are read unverified: `map_shards` verified every reused one just before (fresh ones were
    written by this run), and checksumming a whole partition per bucket would read it `buckets` times."""
    store = ArtifactStore(store_uri)
    map_ref, n_partitions, bits = item
    pieces = [store.read_shard_rows(map_ref, shard, "bucket", bucket) for shard in range(n_partitions)]
    merged = pa.concat_tables(pieces)
    id_type = pa.uint16() if bits == 16 else pa.uint32()
    n_all, out = merged["n"].to_numpy(), []
    for n in sorted(set(n_all.tolist())):
        rows = merged.filter(pc.equal(merged["n"], n))
        keys = np.stack([rows["key0"].to_numpy(), rows["key1"].to_numpy()], axis=1)
        keys, counts = sum_by_key(keys, rows["count"].to_numpy())
        order = np.lexsort((keys[:, 1], keys[:, 0], ~counts))  # count descending, then key
        ids = unpacked_ids(keys[order], n, bits).astype(np.uint16 if bits == 16 else np.uint32).ravel()
        offsets = pa.array(np.arange(0, len(ids) + 1, n, dtype=np.int32))
        out.append(pa.table({"ngram": pa.ListArray.from_arrays(offsets, pa.array(ids, type=id_type)),
                             "n": pa.array(np.full(len(order), n, np.uint8)), "count": pa.array(counts[order])}))
    schema = pa.schema([("ngram", pa.list_(id_type)), ("n", pa.uint8()), ("count", pa.uint64())])
    table = pa.concat_tables(out) if out else schema.empty_table()
    return store.write_shard(ref, bucket, table)


def top_k_table(store: ArtifactStore, counts_ref: str, buckets: int, k: int, tokenizer) -> pa.Table:
    """Top k per n: each bucket is ordered by count within n, so only its first k rows per n can qualify;
    the flow process holds k x buckets rows per n, never the whole table."""
    best = []
    for b in range(buckets):
        table = store.read_shard(counts_ref, b)
        n_col = table["n"].to_numpy()
        for n in np.unique(n_col):  # `take` copies the k rows: a slice would keep the whole bucket alive
            best.append(table.take(np.flatnonzero(n_col == n)[:k]))
    if not best:
        return pa.Table.from_pylist([])
    table, rows = pa.concat_tables(best), []
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
    tokens_manifest = store.manifest(tokens_ref)
    n_shards = tokens_manifest["shards"]
    shard_tokens = [m["tokens"] for m in sorted(store.markers(tokens_ref), key=lambda m: m["shard"])]
    groups = group_shards(shard_tokens, cfg.shard_groups, cfg.group_tokens)
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
    buckets = bucket_count(cfg, tokens_manifest["tokens"])
    mapped = map_shards("ngram-map", store, run.ref("counts_map"), count_partition, [tokens_ref] * n_shards,
                        run.address, max_n=cfg.max_n, buckets=buckets)
    run.commit("counts_map", {"buckets": buckets}, expected_shards=n_shards)
    reduced = map_shards("ngram-reduce", store, run.ref("counts"), reduce_bucket,
                         [(run.ref("counts_map"), n_shards, bits)] * buckets, run.address)
    run.commit("counts", {"max_n": cfg.max_n, "buckets": buckets, "seconds": mapped.seconds + reduced.seconds,
                          "skipped_shards": mapped.skipped + reduced.skipped}, expected_shards=buckets)
    store.write_shard(run.ref("topk"), 0, top_k_table(store, run.ref("counts"), buckets, cfg.top_k, tokenizer))
    run.commit("topk", {"top_k": cfg.top_k}, expected_shards=1)
    log.info("ngram: index of %d tokens in %d groups; exact table n<=%d in %d buckets", index_tokens,
             len(groups), cfg.max_n, buckets)


STAGE = Stage("ngram", NgramConfig, {"topk": "ngram_topk", "index": "ngram_index", "counts_map": "ngram_map",
                                     "counts": "ngram_counts"}, run_ngram,
              needs={"tokens": "tokenize.tokens", "tokenizer": "tokenize.tokenizer"},
              description="infini-gram index + exact n-gram tables over the token shards")
