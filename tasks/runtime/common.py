"""What every stage shares: artifact planning, sharded Dask execution with skip-completed, progress.

A stage is a plain function over artifact references (strings). Its fine-grained work is a list
of shards mapped over the run's Dask cluster with `client.map`; shards whose completion marker
already exists are skipped (DataTrove's `skip_completed`), so a killed run resumes where it was.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm
from tracecore.storage.store import ArtifactStore

# transformers' from_pretrained patches module initialisation process-wide while it loads, so two threads
# loading at once (Dask workers with processes=False) can corrupt each other's weights (seen here: untied
# embeddings, NaN features; a model built meanwhile ends up on the meta device). Every model load or
# construction in a stage takes this lock: stages also run concurrently in threads of the flow process.
MODEL_LOAD_LOCK = threading.Lock()
FAULT_ENV = "TRACECORE_KILL_AT"  # "<stage>:<n>": SIGKILL the run's process group after n new shards (tests)
RAISE_ENV = "TRACECORE_FAIL_AT"  # same spec: raise InjectedFailure instead (a stage error; tests)
DELAY_ENV = "TRACECORE_SHARD_DELAY_S"  # seconds every shard sleeps on a worker with it set (cluster tests)


class InjectedFailure(RuntimeError):
    """Raised by the TRACECORE_FAIL_AT test hook; not transient, so never retried."""


@dataclass
class ShardReport:
    total: int
    skipped: int
    computed: int
    seconds: float
    markers: list[dict] = field(default_factory=list)
    computed_shards: list[int] = field(default_factory=list)

    def sum_computed(self, key: str) -> float:
        """Sum a marker stat over the shards this call computed (for honest throughput numbers)."""
        done = set(self.computed_shards)
        return sum(m.get(key, 0) for m in self.markers if m["shard"] in done)


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run (so logs and artifacts reach the UI)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def get_logger() -> logging.Logger:
    """Prefect's run logger inside a flow/task run (shows in the UI), else a plain logger."""
    if in_prefect_run():
        from prefect import get_run_logger

        return get_run_logger()  # type: ignore[return-value]
    return logging.getLogger("tracecore")


def log_dropped(stage: str, what: str, total: int, reasons: dict[str, int], where: str = "") -> None:
    """One line per drop site: how many of `total` were left out, per reason (nothing when none were)."""
    dropped = {r: n for r, n in reasons.items() if n}
    if dropped:
        get_logger().info("%s: %d of %d %s left out: %s%s", stage, sum(dropped.values()), total, what,
                          ", ".join(f"{n} {r}" for r, n in dropped.items()), f" ({where})" if where else "")


class Progress:
    """A terminal progress bar mirrored to a keyed Prefect progress artifact when in a run."""

    def __init__(self, stage: str, total: int, done: int = 0, unit: str = "shard"):
        self.total, self.done, self.published = max(total, 1), done, -1.0
        self.bar = tqdm(total=total, initial=done, desc=stage, unit=unit, leave=False,
                        disable=True if os.environ.get("TRACECORE_NO_PROGRESS") == "1" else None)
        self.artifact_id = None
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                100.0 * done / self.total, key=f"tracecore-{stage}-progress",
                description=f"{stage}: {unit}s done")

    def step(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        percent = 100.0 * self.done / self.total
        if self.artifact_id is not None and (percent - self.published >= 1.0 or self.done >= self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, percent)  # at most ~100 API calls per stage
            self.published = percent

    def close(self) -> None:
        self.bar.close()


def inject_fault(stage: str, computed: int) -> None:
    """Reliability hook: a real SIGKILL of the whole run mid-stage (`<stage>:<n>`, after n new shards) or
    at a stage boundary (`after-<stage>:1`, right after the stage committed), so tests exercise resume;
    the same spec in TRACECORE_FAIL_AT raises an ordinary error there instead."""
    failing = os.environ.get(RAISE_ENV, "")
    if failing and failing.split(":")[0] == stage and computed >= int(failing.split(":")[1]):
        raise InjectedFailure(f"{RAISE_ENV}={failing}: injected failure in {stage} after {computed} shard(s)")
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec.split(":")[0] == stage and computed >= int(spec.split(":")[1]):
        if os.getpgrp() == os.getpid():  # a session leader (tests start runs so): take the workers down too
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def run_shard(fn: Callable[..., dict], *args: Any, **kwargs: Any) -> dict:
    """One shard on a worker. Reliability hook: `TRACECORE_SHARD_DELAY_S` in a worker's environment slows
    every shard it runs, so a test can kill that worker while a stage is surely in flight."""
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    return fn(*args, **kwargs)


@contextmanager
def dask_client(cluster: Any) -> Iterator[Any]:
    """A client on the run's cluster. `cluster`: a connected `distributed.Client` (the stage's own, used as it
    is), a scheduler address (a client for this block: opening and closing one took ~17 ms), or None (run
    shards in this process: tests, debugging)."""
    if not isinstance(cluster, str):
        yield cluster
        return
    from distributed import Client

    with Client(cluster, set_as_default=False) as client:
        yield client


def worker_threads(cluster: Any) -> int:
    """Task slots of the run's cluster (1 when shards run in this process)."""
    with dask_client(cluster) as client:
        return sum(client.nthreads().values()) if client is not None else 1


def host_threads(cluster: Any) -> tuple[int, int]:
    """(the most task slots on one host, all task slots) of the run's cluster; this machine's cores when
    shards run in this process (a subprocess such as the infini-gram indexer may use them all)."""
    with dask_client(cluster) as client:
        if client is None:
            return (os.cpu_count() or 1,) * 2
        per_host: dict[str, int] = {}
        for worker in client.scheduler_info(n_workers=-1)["workers"].values():
            per_host[worker["host"]] = per_host.get(worker["host"], 0) + worker["nthreads"]
        return max(per_host.values(), default=1), sum(per_host.values()) or 1


def usable_markers(store: ArtifactStore, ref: str) -> dict[int, dict]:
    """Markers of the finished shards whose files still match them (`part_intact`: no byte read when their
    stamps agree); a corrupt shard is dropped, and logged, so it is recomputed."""
    usable = {}
    for marker in store.markers(ref):
        path = store.shard_path(ref, marker["shard"])
        if store.part_intact(path, marker):
            usable[marker["shard"]] = marker
        else:
            get_logger().warning("shard %s is corrupt (checksum mismatch); recomputing it", path)
            store.drop_shard(ref, marker["shard"])
    return usable


def map_shards(stage: str, store: ArtifactStore, ref: str, fn: Callable[..., dict], items: list[Any],
               cluster: Any, **kwargs: Any) -> ShardReport:
    """Run `fn(store_uri, ref, shard, item, **kwargs) -> marker` for every shard not yet complete, on
    `cluster` (see `dask_client`). The report's markers are the kept shards' plus those the workers returned
    (not re-read)."""
    start = time.perf_counter()
    done = usable_markers(store, ref)
    todo = [(i, item) for i, item in enumerate(items) if i not in done]
    skipped = len(items) - len(todo)
    log = get_logger()
    if skipped:
        log.info("%s: skipping %d/%d completed shards of %s", stage, skipped, len(items), ref)
    progress = Progress(stage, len(items), skipped)
    computed: list[int] = []
    try:
        with dask_client(cluster if todo else None) as client:  # nothing to do: no cluster round trip
            if client is None:
                results = (run_shard(fn, store.uri, ref, i, item, **kwargs) for i, item in todo)
            else:
                from distributed import as_completed

                futures = [client.submit(run_shard, fn, store.uri, ref, i, item, key=f"{stage}-{ref}-{i}",
                                         pure=False, **kwargs)
                           for i, item in todo]
                results = (f.result() for f in as_completed(futures, loop=client.loop))
            for marker in results:
                done[marker["shard"]] = marker
                computed.append(marker["shard"])
                progress.step()
                inject_fault(stage, len(computed))
    finally:
        progress.close()
    return ShardReport(total=len(items), skipped=skipped, computed=len(computed),
                       seconds=round(time.perf_counter() - start, 3), markers=[done[i] for i in sorted(done)],
                       computed_shards=sorted(computed))


def set_torch_threads(requested: int | None) -> None:
    """Set torch's threads to `requested`, capped at the CPUs this process may run on: two threads pinned to
    one core (`taskset -c 0`, a 1-CPU container) contend for it and run slower than one. 0/None: leave as is
    (in a Dask worker that is 1: Dask pins its workers' math libraries to one thread)."""
    if requested:
        import torch

        torch.set_num_threads(max(1, min(requested, len(os.sched_getaffinity(0)))))
