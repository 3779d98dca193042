"""Run records: `runs/<run_id>/run.json` holds the resolved config and each stage's state.

The record is what `--resume RUN_ID`, `tracecore status` and `tracecore artifacts` read.
Artifacts themselves are shared between runs (content-addressed); a run only points at them.
"""

from __future__ import annotations

import secrets
import threading
import time

from tracecore.storage.fs import read_json, write_json
from tracecore.storage.store import ArtifactStore


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_path(store: ArtifactStore, run_id: str) -> str:
    return f"{store.run_dir(run_id)}/run.json"


def read_run(store: ArtifactStore, run_id: str | None = None) -> dict:
    """A run's record; None = the most recent run in the store."""
    if run_id is None:
        runs = store.list_runs()
        if not runs:
            raise FileNotFoundError(f"no runs in store {store.uri}")
        run_id = runs[-1]
    path = run_path(store, run_id)
    if not store.fs.exists(path):
        raise FileNotFoundError(f"run {run_id!r} not found in store {store.uri} (known: "
                                f"{store.list_runs()[-5:]})")
    return read_json(store.fs, path)


def write_run(store: ArtifactStore, record: dict) -> None:
    record["updated_at"] = now()
    write_json(store.fs, run_path(store, record["run_id"]), record)


def start_run(store: ArtifactStore, run_id: str, config: dict) -> dict:
    """Create or reopen (resume) a run record."""
    path = run_path(store, run_id)
    record = read_json(store.fs, path) if store.fs.exists(path) else {"run_id": run_id, "created_at": now(),
                                                                       "stages": {}, "attempts": 0}
    record.update({"config": config, "state": "running", "attempts": record.get("attempts", 0) + 1})
    write_run(store, record)
    return record


def set_stage(store: ArtifactStore, record: dict, stage: str, **fields) -> None:
    record["stages"].setdefault(stage, {}).update(fields)
    write_run(store, record)


class RunRecorder:
    """Thread-safe stage bookkeeping for a run record: stages run concurrently (Prefect's thread pool), each
    writes its start, end or failure; `started_s`/`finished_s` (epoch seconds) show which ones overlapped."""

    def __init__(self, store: ArtifactStore, record: dict):
        self.store, self.record, self.lock, self.reused = store, record, threading.Lock(), {}

    def _set(self, stage: str, **fields) -> None:
        with self.lock:
            set_stage(self.store, self.record, stage, **fields)

    def planned(self, stage: str, refs: dict[str, str], reused: bool) -> None:
        self.reused[stage] = reused
        self._set(stage, refs=refs, status="pending", error=None, started_at=None, finished_at=None)

    def started(self, stage: str) -> None:
        self._set(stage, status="running", started_at=now(), started_s=round(time.time(), 3))

    def finished(self, stage: str) -> None:
        info = self.record["stages"][stage]
        seconds = round(time.time() - info.get("started_s", time.time()), 3)
        self._set(stage, status="reused" if self.reused.get(stage) else "computed", finished_at=now(),
                  finished_s=round(time.time(), 3), seconds=seconds)

    def failed(self, stage: str, exc: BaseException) -> None:
        self._set(stage, status="failed", error=f"{type(exc).__name__}: {exc}")

    def settle(self) -> None:
        for stage, info in self.record["stages"].items():
            if info.get("status") == "pending" and stage in self.reused:
                self.started(stage)
                self.finished(stage)
