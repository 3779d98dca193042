"""Benchmark: TAGCOS selection time for synthetic gradient features.

    .venv/bin/python bench/select_coreset.py [--rows 100000] [--dim 1024] [--clusters 100]

Features: unit vectors drawn around 100 random directions (a mixture, like clustered gradients).
Timed: K-means (MiniBatchKMeans above `select.minibatch_above` rows) and the per-cluster OMP with its
fill-up and residual checks, run over clusters on a 2-worker LocalCluster, against the same OMP run
serially in one process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tracecore.configs.schema import SelectConfig
from tracecore.tasks.runtime.common import map_shards
from tracecore.tasks.select import cluster_features, select_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=100)
    args = parser.parse_args()
    import os

    os.environ["TRACECORE_NO_PROGRESS"] = "1"
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.runtime import dask_cluster
    from tracecore.storage.store import ArtifactStore

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    X = centers[rng.integers(0, args.clusters,
                             args.rows)] + 2.0 * rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ids = [f"r{i}" for i in range(args.rows)]
    cfg = SelectConfig(clusters=args.clusters)
    start = time.perf_counter()
    labels, centroids = cluster_features(X, cfg)
    t_kmeans = time.perf_counter() - start
    items = []
    for c in range(len(centroids)):
        members = np.flatnonzero(labels == c)
        items.append(([ids[i] for i in members], X[members], centroids[c], int(cfg.rate * len(members))))
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(f"{tmp}/store")
        start = time.perf_counter()
        map_shards("select", store, "bench/serial", select_cluster, items, None, lam=1.0, tol=1e-4, seed=0)
        timings["serial"] = time.perf_counter() - start
        # as a run starts its own
        with dask_cluster(DaskConfig(n_workers=2, threads_per_worker=1)) as address:
            start = time.perf_counter()
            map_shards("select", store, "bench/dask", select_cluster, items, address,
                       lam=1.0, tol=1e-4, seed=0)
            timings["dask"] = time.perf_counter() - start
    kind = "MiniBatchKMeans" if args.rows > cfg.minibatch_above else "KMeans"
    print(f"\nTAGCOS selection, {args.rows:,} x {args.dim} features, K={len(centroids)}, rate {cfg.rate}")
    print("| step                                   | seconds |")
    print("|----------------------------------------|---------|")
    print(f"| {kind + ' (k-means++)':<38} | {t_kmeans:>7.1f} |")
    print(f"| {'per-cluster OMP, serial':<38} | {timings['serial']:>7.1f} |")
    print(f"| {'per-cluster OMP, Dask 2 workers':<38} | {timings['dask']:>7.1f} |")
    print(f"| {'total (K-means + Dask OMP)':<38} | {t_kmeans + timings['dask']:>7.1f} |")


if __name__ == "__main__":
    main()
