"""Stage `ngram`: corpus n-gram counting — an infini-gram index and an exact small-n table.

* infini-gram index: the package's tokenizer step needs the hub, so we write its on-disk format
  ourselves (`tokenized.0`: each document = 0xFFFF separator + little-endian ids; `offset.0`: u64
  byte offset of each document) and build the suffix array with the package's `rust_indexing` binary,
  driven as `python -m infini_gram.indexing` drives it (`build_suffix_array` says why not through that).
  One index per shard group, groups built in parallel on Dask, queried together through one
  `InfiniGramEngine`.
* exact table (`tasks/ngram_table.py`): map-reduce over token shards, n-grams packed losslessly into
  integer keys, counted per partition (map), summed per hash bucket (reduce), and written as Parquet
  (`ngram`, `n`, `count`) plus a top-k table.
* ids: u16 when the tokenizer has <= 65,535 tokens, else u32 (Llama 3, Qwen 2, Gemma): token shards and the
  exact table hold u32 ids; the index holds each id as two u16 symbols (`PairedEngine`), because
  infini-gram 2.6's own u32 suffix-array builder allocates 2^32 x 8 bytes (32 GiB) per job (measured:
  "memory allocation of 34359738368 bytes failed" on a 40-document corpus), more than a CI machine has.
Both are resumable per shard group / partition / bucket.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import infini_gram.indexing
import numpy as np
import pyarrow as pa
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.storage.files import FILES_DIR
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.ngram_engine import MAX_PAIRED_ID, VocabMismatchError, to_symbols, token_dtype
from tracecore.tasks.ngram_table import (
    KEY_WORDS,
    bucket_count,
    count_partition,
    flat_ids,
    id_bits,
    map_partitions,
    reduce_bucket,
    top_k_table,
)
from tracecore.tasks.runtime.common import host_threads
from tracecore.tasks.runtime.stage import Stage, StageRun


class NgramConfig(Strict):
    """Corpus n-gram counting: infini-gram index + exact small-n table."""

    shard_groups: int = Field(2, ge=1, le=4096, description="infini-gram indexes built in parallel, at least")
    group_tokens: int = Field(10_000_000, ge=1_000, description=(
        "at most this many tokens per index group (unless one token shard is larger): the indexer's memory "
        "(~20 bytes per token of its group) stays bounded as the corpus grows"))
    index_mem_gib: int = Field(2, ge=1, le=4096)
    index_cpus: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field("auto", description=(
        "cpus per indexer process; auto = the cluster's threads shared by the index groups by their tokens "
        "(at most one host's), so one or two groups do not index on one core while the rest idle"))
    max_n: int = Field(3, ge=1, le=4, description="exact table holds n-grams for n = 1..max_n")
    buckets: int = Field(16, ge=1, le=65_535, description="exact-table reduce partitions, at least")
    bucket_tokens: int = Field(2_000_000, ge=1_000, description=(
        "one more bucket per this many corpus tokens (beyond `buckets`), so a reduce task's memory stays "
        "bounded as the corpus grows"))
    map_tokens: int = Field(4_000_000, ge=1_000, description=(
        "exact-table map tasks hold about this many tokens: a larger token shard is cut into row ranges (a "
        "document is never cut), so a map task's memory (~120 bytes per token) is bounded by this setting"))
    top_k: int = Field(100, ge=1)


class EmptyCorpusError(ValueError):
    pass


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
    indexer's memory (about 20 bytes per token of its group) does not grow with the corpus."""
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


def run_package_indexer(folder: Path, mem_gib: int, cpus: int) -> None:
    """The package's own driver, as a user runs it (`python -m infini_gram.indexing`; its tokenize step is
    skipped because tokenized.0/offset.0 exist): the reference `build_suffix_array` is tested against, and the
    bench's
    peer."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ulimit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    cmd = [sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(folder), "--save_dir", str(folder),
           "--temp_dir", str(folder / "tmp"), "--token_dtype", "u16", "--mem", str(mem_gib), "--cpus",
           str(cpus), "--ulimit", str(ulimit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (folder / "table.0").exists():
        raise RuntimeError(f"infini-gram indexer failed in {folder}: {proc.stdout[-500:]} "
                           f"{proc.stderr[-1000:]}")


def suffix_array_jobs(size: int, mem_bytes: int, cpus: int, width: int = 2) -> list[list[tuple[int, int]]]:
    """Byte ranges of the make-part jobs, in batches of `cpus` run together: infini-gram's own split
    (`indexing.build_sa`): batches double until a batch's parts fit in memory at 8 bytes per u16 token, each
    part
    is a whole number of tokens and overlaps the next by the package's HACK bytes."""
    batches = 1
    while batches * max(1, mem_bytes // 8) < size:
        batches *= 2
    total = batches * cpus
    step = size // total + (-(size // total) % width)
    ranges = [(i * step, min((i + 1) * step + infini_gram.indexing.HACK, size)) for i in range(total)]
    return [ranges[b:b + cpus] for b in range(0, total, cpus)]


def rust_indexing(*args: object) -> subprocess.Popen:
    binary = Path(infini_gram.indexing.__file__).parent / "rust_indexing"
    return subprocess.Popen([str(binary), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_all(procs: list[subprocess.Popen], step: str, folder: Path) -> None:
    """Wait for every process of a step; the first failure in one line."""
    errors = [(p.returncode, err) for p in procs for _, err in [p.communicate()] if p.returncode != 0]
    if errors:
        raise RuntimeError(f"infini-gram indexer step {step} failed in {folder} (exit {errors[0][0]}): "
                           f"{panic_message(errors[0][1])}")


def panic_message(stderr: str) -> str:
    """The binary's own message: the line after Rust's "thread 'main' panicked at ...", not the backtrace."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()] or ["no message on stderr"]
    at = next((i for i, line in enumerate(lines) if "panicked at" in line), None)
    return (lines[at + 1] if at is not None and at + 1 < len(lines) else lines[-1])[-300:]


def build_suffix_array(folder: Path, mem_bytes: int, cpus: int) -> None:
    """`table.0` for `tokenized.0`: infini-gram's suffix-array steps (make-part, merge, concat) run straight
    from the package's `rust_indexing` binary with the arguments its Python driver gives them (`build_sa`), so
    the index is byte-identical to `python -m infini_gram.indexing` (tested). Why not that driver: as a
    process it costs an interpreter start and numpy/tqdm imports per group, as much as the binary's own work
    on a small group, and called in-process it chdirs the whole Dask worker."""
    data = folder / "tokenized.0"
    size = data.stat().st_size
    ratio = int(np.ceil(np.log2(size) / 8))
    parts, merged = folder / "tmp" / "parts", folder / "tmp" / "merged"
    parts.mkdir(parents=True)
    merged.mkdir()
    raise_open_files_limit()  # the merge opens every part at once, as the package's --ulimit allows
    for batch in suffix_array_jobs(size, mem_bytes, cpus):
        wait_all([rust_indexing("make-part", "--data-file", data, "--parts-dir", parts, "--start-byte", start,
                                "--end-byte", end, "--ratio", ratio, "--token-width", 2)
                                    for start, end in batch],
                 "make-part", folder)
    wait_all([rust_indexing("merge", "--data-file", data, "--parts-dir", parts, "--merged-dir", merged,
                            "--num-threads", cpus, "--hacksize", infini_gram.indexing.HACK, "--ratio", ratio,
                            "--token-width", 2)],
             "merge", folder)
    wait_all([rust_indexing("concat", "--data-file", data, "--merged-dir", merged, "--merged-file",
                            folder / "table.0", "--num-threads", cpus, "--ratio", ratio, "--token-width", 2)],
             "concat", folder)
    shutil.rmtree(folder / "tmp")


def raise_open_files_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit may exceed the kernel's nr_open
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def indexer_cpus(setting: int | str, group_tokens: list[int], host_threads: int,
                 total_threads: int | None = None) -> list[int]:
    """`ngram.index_cpus` per group. auto: the cluster's threads shared by the groups in proportion to their
    tokens, at least 1 and at most one host's threads each (the indexer is one process on one machine), so a
    corpus of one or two groups does not index on one core while the others idle (the index is
    byte-identical whatever the cpus)."""
    if setting != "auto":
        return [int(setting)] * len(group_tokens)
    threads, total = total_threads or host_threads, sum(group_tokens) or 1
    return [min(host_threads, max(1, round(threads * t / total))) for t in group_tokens]


def build_index_group(store_uri: str, ref: str, group: int, item: tuple, mem_gib: int) -> dict:
    store = ArtifactStore(store_uri)
    tokens_ref, tokenizer_ref, shards, vocab_size, cpus = item
    bits = id_bits(store, tokens_ref)
    with tempfile.TemporaryDirectory(prefix="tracecore-igram-") as tmp:
        folder = Path(tmp)
        docs, tokens = write_infinigram_files(store, tokens_ref, shards, vocab_size, folder, bits)
        # The indexer splits the work in `cpus` parts only when the group is large enough.
        build_suffix_array(folder, mem_gib * 2**30, cpus if tokens * 2 >= cpus * 200_000 else 1)
        for name in ("tokenized.0", "offset.0", "table.0"):
            store.put_file(ref, f"group-{group:03d}/{name}", folder / name, move=True)  # streamed: GBs
    summary = pa.table({"group": [group], "folder": [f"{FILES_DIR}/group-{group:03d}"],
                        "token_shards": [shards],
                        "documents": [docs], "tokens": [tokens], "tokenizer": [tokenizer_ref],
                        "vocab_size": [vocab_size], "token_dtype": [token_dtype(bits)]})
    return store.write_shard(ref, group, summary, documents=docs, tokens=tokens)


def run_ngram(run: StageRun) -> None:
    from transformers import AutoTokenizer

    store, cfg, log = run.store, run.cfg, run.log
    tokens_ref, tokenizer_ref = run.inputs["tokens"], run.inputs["tokenizer"]
    with store.local_dir(tokenizer_ref) as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    bits = check_inputs(store, cfg, tokens_ref, len(tokenizer))
    tokens_manifest = store.manifest(tokens_ref)
    shard_tokens = [m["tokens"] for m in sorted(store.markers(tokens_ref), key=lambda m: m["shard"])]
    groups = group_shards(shard_tokens, cfg.shard_groups, cfg.group_tokens)
    host, total = host_threads(run.cluster) if cfg.index_cpus == "auto" else (1, 1)
    cpus = indexer_cpus(cfg.index_cpus, [sum(shard_tokens[s] for s in g) for g in groups], host, total)
    index = run.map("index", build_index_group,
                    [(tokens_ref, tokenizer_ref, g, len(tokenizer), c) for g, c in zip(groups, cpus)],
                    mem_gib=cfg.index_mem_gib)
    index_tokens = index.sum_computed("tokens")
    run.commit("index", {"tokenizer": tokenizer_ref, "vocab_size": len(tokenizer),
                         "eos_token_id": tokenizer.eos_token_id, "token_dtype": token_dtype(bits),
                         "tokens": sum(m["tokens"] for m in index.markers),
                         "documents": sum(m["documents"] for m in index.markers),
                         "seconds": index.seconds, "skipped_shards": index.skipped,
                         "tokens_per_second": round(index_tokens / index.seconds, 1) if index.computed
                             else None},
               expected_shards=len(groups))
    buckets = bucket_count(cfg, tokens_manifest["tokens"])
    parts = map_partitions(store, tokens_ref, cfg.map_tokens)
    mapped = run.map("counts_map", count_partition, parts, max_n=cfg.max_n, buckets=buckets)
    run.commit("counts_map", {"buckets": buckets, "partitions": [list(p[1:]) for p in parts]},
               expected_shards=len(parts))
    reduced = run.map("counts", reduce_bucket, [(run.ref("counts_map"), len(parts), bits)] * buckets)
    run.commit("counts", {"max_n": cfg.max_n, "buckets": buckets, "seconds": mapped.seconds + reduced.seconds,
                          "skipped_shards": mapped.skipped + reduced.skipped}, expected_shards=buckets)
    run.write("topk", top_k_table(store, run.ref("counts"), buckets, cfg.top_k, tokenizer),
              {"top_k": cfg.top_k})
    log.info("ngram: index of %d tokens in %d groups; exact table n<=%d in %d buckets", index_tokens,
             len(groups), cfg.max_n, buckets)


STAGE = Stage("ngram", NgramConfig, {"topk": "ngram_topk", "index": "ngram_index", "counts_map": "ngram_map",
                                     "counts": "ngram_counts"}, run_ngram,
              needs={"tokens": "tokenize.tokens", "tokenizer": "tokenize.tokenizer"},
              description="infini-gram index + exact n-gram tables over the token shards")
