"""A Dask worker killed mid-stage: the stage finishes on the remaining/restarted workers, and no shard
that was already committed is computed again."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyarrow as pa
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.common import map_shards


def shard_that_kills_its_worker_once(store_uri: str, ref: str, shard: int, item: str, flags: str) -> dict:
    """Shard 1's first attempt kills the worker process running it (like an OOM kill); others just work."""
    if shard == 1 and not (Path(flags) / "died").exists():
        (Path(flags) / "died").write_text(str(os.getpid()))
        os._exit(1)
    time.sleep(0.2)
    (Path(flags) / f"ran-{shard}-{time.time_ns()}").write_text(item)
    return ArtifactStore(store_uri).write_shard(ref, shard, pa.table({"item": [item]}))


def test_stage_survives_a_killed_worker_without_recomputing_committed_shards(tmp_path):
    import cloudpickle
    from distributed import LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    flags = tmp_path / "flags"
    flags.mkdir()
    store = ArtifactStore(tmp_path / "store")
    items = [f"item-{i}" for i in range(6)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        report = map_shards("worker-loss", store, "test/ref", shard_that_kills_its_worker_once, items,
                            cluster.scheduler_address, flags=str(flags))
    assert (flags / "died").exists()  # a worker really died
    assert report.computed == 6 and sorted(m["shard"] for m in store.markers("test/ref")) == list(range(6))
    ran = sorted(p.name.split("-")[1] for p in flags.glob("ran-*"))
    assert ran == [str(i) for i in range(6)]  # every shard computed exactly once
    table = pa.concat_tables(store.read_shard("test/ref", i) for i in range(6))
    assert table.column("item").to_pylist() == items
