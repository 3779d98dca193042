"""Run records: `runs/<run_id>/run.json` holds the resolved config and each stage's state.

The record is what `--resume RUN_ID`, `tracecore status` and `tracecore artifacts` read.
Artifacts themselves are shared between runs (content-addressed); a run only points at them.
"""

from __future__ import annotations

import secrets
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
        raise FileNotFoundError(f"run {run_id!r} not found in store {store.uri} (known: {store.list_runs()[-5:]})")
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
