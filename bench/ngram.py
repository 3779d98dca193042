"""Benchmark: corpus n-gram counting on the sample corpus.

    .venv/bin/python bench/ngram.py [--filler-documents 10000] [--queries 2000]

Rows (tokens/s, one run, same token shards): the infini-gram index build (our writer + the package's
suffix-array indexer, 2 shard groups on a 2-worker LocalCluster), the exact n<=3 table as Dask
map-reduce on the same cluster, and a plain Python `collections.Counter` over n-grams 1..3 in one
process. Then query throughput of the built index: `count` of random corpus n-grams and `count_cnf`
co-occurrence of random n-gram pairs (window 100 tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRACECORE_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tracecore.configs.schema import SampleConfig
from tracecore.flows.pipeline import run_stages
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.ngram_engine import open_engine
from tracecore.tasks.runtime.registry import validate_config
from tracecore.tasks.world import write_sample


def counter_baseline(docs: list[list[int]], max_n: int) -> float:
    start = time.perf_counter()
    counts: Counter = Counter()
    for doc in docs:
        for n in range(1, max_n + 1):
            counts.update(tuple(doc[i:i + n]) for i in range(len(doc) - n + 1))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filler-documents", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.runtime import dask_cluster

    with tempfile.TemporaryDirectory(prefix="tracecore-bench-") as tmp, \
            dask_cluster(DaskConfig(n_workers=2, threads_per_worker=1)) as address:  # as a run starts its own
        store_uri = f"{tmp}/store"
        write_sample(SampleConfig(filler_documents=args.filler_documents), f"{tmp}/world")
        pipeline_cfg = validate_config({"store": store_uri,
                                        "ingest": {"paths": [f"{tmp}/world/corpus/*.jsonl.gz"]}})
        all_refs, cfg = run_stages(pipeline_cfg, ["ngram"], address), pipeline_cfg.ngram
        refs = {k.split(".", 1)[1]: v for k, v in all_refs.items() if k.startswith("ngram.")}
        store = ArtifactStore(store_uri)
        tokens = store.manifest(refs["index"])["tokens"]
        index_s, table_s = store.manifest(refs["index"])["seconds"], store.manifest(refs["counts"])["seconds"]
        docs = store.read_table(all_refs["tokenize.tokens"], columns=["tokens"]).column(0).to_pylist()
        counter_s = counter_baseline(docs, cfg.max_n)

        rng = np.random.default_rng(0)
        grams = store.read_table(refs["counts"]).column("ngram").to_pylist()
        sample = [grams[i] for i in rng.integers(0, len(grams), args.queries)]
        with open_engine(store, refs["index"]) as engine:
            start = time.perf_counter()
            for g in sample:
                engine.count(g)
            count_s = time.perf_counter() - start
            pairs = list(zip(sample[: args.queries // 4], sample[args.queries // 4: args.queries // 2]))
            start = time.perf_counter()
            for a, b in pairs:
                engine.count_cnf([[a], [b]], max_diff_tokens=100)
            cnf_s = time.perf_counter() - start

    base = tokens / counter_s
    print(f"\nn-gram counting, {tokens:,} tokens, n<=3, {os.cpu_count()} cores, 2 Dask workers")
    print("| method                                     | seconds |   tokens/s | vs Counter |")
    print("|--------------------------------------------|---------|------------|------------|")
    for name, secs in (("infini-gram index build (2 groups, Dask)", index_s),
                       ("exact table, Dask map-reduce (16 buckets)", table_s),
                       ("Python Counter, 1 process", counter_s)):
        print(f"| {name:<42} | {secs:>7.2f} | {tokens / secs:>10,.0f} | {tokens / secs / base:>9.2f}x |")
    print("\n| query                               | queries | seconds |  queries/s |")
    print("|-------------------------------------|---------|---------|------------|")
    print(f"| count(n-gram)                       | {len(sample):>7} | {count_s:>7.3f} | "
          f"{len(sample) / count_s:>10,.0f} |")
    print(f"| count_cnf(a AND b, window 100)      | {len(pairs):>7} | {cnf_s:>7.3f} | "
          f"{len(pairs) / cnf_s:>10,.0f} |")


if __name__ == "__main__":
    main()
