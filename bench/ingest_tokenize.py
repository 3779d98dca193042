"""Benchmark: ingest + tokenize tokens/s on the sample corpus, tracecore on Dask vs a plain loop.

    .venv/bin/python bench/ingest_tokenize.py [--files 8] [--filler-documents 10000] [--repeats 2]

Rows: a plain single-process loop over the same files doing the same work (read, validate,
de-duplicate, tokenize, write Parquet), then tracecore's ingest+tokenize stages on a LocalCluster
with 1 and 2 worker processes. All use one pre-trained tokenizer (training excluded) and
TOKENIZERS_PARALLELISM=false, so each process encodes on one core. Cluster start-up is
reported separately and excluded from tokens/s. Each stage run starts from an empty store.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRACECORE_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.parquet as pq
from scale import new_valid_texts
from tracecore.configs.schema import IngestConfig, SampleConfig
from tracecore.flows.pipeline import run_stages
from tracecore.tasks.ingest import list_input_files
from tracecore.tasks.runtime.registry import validate_config
from tracecore.tasks.tokenize import train_bpe
from tracecore.tasks.world import write_sample


def plain_loop(files: list[Path], tokenizer_json: Path, out_dir: Path) -> int:
    """The baseline a user would write first: one process, file by file."""
    from tokenizers import Tokenizer

    tok, seen, total = Tokenizer.from_file(str(tokenizer_json)), set(), 0
    cfg = IngestConfig()
    for k, path in enumerate(files):
        texts = list(new_valid_texts(gzip.decompress(path.read_bytes()).splitlines(), cfg, seen))
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        total += sum(map(len, ids))
        pq.write_table(pa.table({"tokens": pa.array(ids, type=pa.list_(pa.uint16()))}),
                       out_dir / f"{k}.parquet")
    return total


def tracecore_stages(files: list[str], tokenizer_dir: Path, store_uri: str, address: str) -> int:
    cfg = validate_config({"store": store_uri, "ingest": {"paths": files},
                           "tokenize": {"tokenizer_path": str(tokenizer_dir)}})
    refs = run_stages(cfg, ["tokenize"], address)
    from tracecore.storage.store import ArtifactStore

    return ArtifactStore(store_uri).manifest(refs["tokenize.tokens"])["tokens"]


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8, help="corpus files (shards)")
    parser.add_argument("--filler-documents", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N per row")
    args = parser.parse_args()
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.runtime import dask_cluster

    with tempfile.TemporaryDirectory(prefix="tracecore-bench-") as tmp:
        tmp = Path(tmp)
        write_sample(SampleConfig(filler_documents=args.filler_documents, corpus_files=args.files),
                     tmp / "world")
        paths = sorted((tmp / "world/corpus").glob("*.jsonl.gz"))
        texts = [json.loads(x)["text"] for x in gzip.decompress(paths[0].read_bytes()).splitlines()]
        train_bpe(texts, 4096, 2, tmp / "tok")
        rows = []
        best = min(timed(plain_loop, paths, tmp / "tok/tokenizer.json", _fresh(tmp, "loop"))
                   for _ in range(args.repeats))
        rows.append(("plain loop, 1 process", *best, 0.0))
        files = list_input_files([str(tmp / "world/corpus/*.jsonl.gz")])
        for workers in (1, 2):
            start = time.perf_counter()
            # as a run's own
            with dask_cluster(DaskConfig(n_workers=workers, threads_per_worker=1)) as address:
                startup = time.perf_counter() - start
                best = min(timed(tracecore_stages, files, tmp / "tok", str(_fresh(tmp, f"w{workers}")),
                                 address)
                           for _ in range(args.repeats))
            rows.append((f"tracecore on Dask, {workers} worker(s)", *best, startup))
    base = rows[0][2] / rows[0][1]
    print(f"\ningest+tokenize, {args.files} files, {rows[0][2]:,} tokens, best of {args.repeats}, "
          f"{os.cpu_count()} cores")
    print(f"| {'run':<30} | {'seconds':>8} | {'tokens/s':>10} | {'vs loop':>7} | {'cluster start s':>15} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 12}|{'-' * 9}|{'-' * 17}|")
    for name, seconds, tokens, startup in rows:
        rate = tokens / seconds
        print(f"| {name:<30} | {seconds:>8.2f} | {rate:>10,.0f} | {rate / base:>6.2f}x | {startup:>15.1f} |")


def _fresh(tmp: Path, name: str) -> Path:
    """A new empty output folder per repeat, so nothing is skipped as already done."""
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    return path


if __name__ == "__main__":
    main()
