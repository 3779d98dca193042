"""Prefect flows: one per stage, and `pipeline` chaining them on one Dask cluster per run.

Flows only wire: plan the stage (artifact refs), call its coarse Prefect task with the refs
and the cluster address (strings only), record the outcome in the run record.
A stage whose artifact is committed is reused; Prefect's cache (keyed on the same refs) marks
it Cached in the UI, and `refresh_cache` is forced when the store lacks the artifact so the
cache can never point at missing data.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from tracecore.configs.schema import STAGES, load_config, validate_config
from tracecore.flows.plan import PRIMARY, needed_stages, stage_call
from tracecore.flows.report import write_report
from tracecore.flows.runtime import dask_cluster
from tracecore.storage.runs import new_run_id, now, set_stage, start_run, write_run
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.common import inject_fault
from tracecore.tasks.eval import eval_task
from tracecore.tasks.finetune import finetune_task
from tracecore.tasks.gradients import gradients_task
from tracecore.tasks.ingest import ingest_task
from tracecore.tasks.memorization import memorization_task
from tracecore.tasks.ngram import ngram_task
from tracecore.tasks.preference import preference_task
from tracecore.tasks.pretrain import pretrain_task
from tracecore.tasks.sample import sample_task
from tracecore.tasks.select import select_task
from tracecore.tasks.tokenize import tokenize_task

TASKS = {"sample": sample_task, "ingest": ingest_task, "tokenize": tokenize_task, "pretrain": pretrain_task,
         "ngram": ngram_task, "memorization": memorization_task, "gradients": gradients_task,
         "select": select_task, "preference": preference_task, "finetune": finetune_task,
         "eval": eval_task}


def execute_stage(stage: str, config: dict, refs: dict[str, str], address: str | None,
                  record: dict | None = None) -> dict[str, str]:
    """Plan + run one stage, or reuse its committed artifacts; returns the stage's artifact refs."""
    cfg = validate_config(config)
    store = ArtifactStore(cfg.store)
    call = stage_call(stage, cfg, store.uri, refs)
    primary = call["refs"][PRIMARY[stage]]
    done_before = store.is_committed(primary) and not store.corrupt_parts(primary)  # else: run, repair
    if record is not None:
        set_stage(store, record, stage, refs=call["refs"], started_at=now(), status="running", error=None)
    task = TASKS[stage].with_options(refresh_cache=not done_before)
    start = time.perf_counter()
    try:
        task(store_uri=store.uri, address=address, **call)
    except BaseException as exc:
        if record is not None:
            set_stage(store, record, stage, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if record is not None:
        set_stage(store, record, stage, status="reused" if done_before else "computed", finished_at=now(),
                  seconds=round(time.perf_counter() - start, 3))
    inject_fault(f"after-{stage}", 1)
    return call["refs"]


def _stage_flow(stage: str):
    @flow(name=f"tracecore-{stage}", log_prints=True)
    def stage_flow(config: dict, address: str | None = None) -> dict[str, str]:
        """Run one stage (and whatever upstream artifacts it needs that are not in the store yet)."""
        config = {**config, "stages": [stage]}
        cfg, refs = validate_config(config), {}
        with dask_cluster(cfg.dask, address) as addr:
            for needed in needed_stages(cfg):
                refs.update(execute_stage(needed, config, refs, addr))
        return refs

    return stage_flow


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGES}


@flow(name="tracecore-pipeline", log_prints=True)
def pipeline(config: dict, run_id: str | None = None) -> dict[str, Any]:
    """The whole pipeline: every needed stage in order on one Dask cluster; returns refs + report path.

    `run_id` None (scheduled runs) = a new id; a given id re-uses that run record (resume)."""
    cfg = validate_config(config)
    run_id = run_id or new_run_id()
    store = ArtifactStore(cfg.store)
    record = start_run(store, run_id, cfg.model_dump(mode="json"))
    if cfg.calibrate:
        from tracecore.flows.calibrate import calibrate

        record["calibration"] = calibrate()
    refs: dict[str, str] = {}
    started = time.perf_counter()
    try:
        with dask_cluster(cfg.dask) as address:
            for stage in needed_stages(cfg):
                refs.update(execute_stage(stage, config, refs, address, record))
        record["state"] = "completed"
    except BaseException:
        record["state"] = "failed"
        raise
    finally:
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_run(store, record)
        record["report"] = write_report(store, record)
        write_run(store, record)
    return {"refs": refs, "report": record["report"]}


@flow(name="tracecore-profile", log_prints=True)
def run_profile(profile: str = "tiny", overrides: list[str] | None = None, store: str | None = None,
                stages: list[str] | None = None) -> dict[str, Any]:
    """Entry point for deployments (schedules, `prefect.yaml`, UI "Run"): a profile name or YAML path plus
    `--set`-style overrides; validated here, then the pipeline flow runs as a subflow."""
    cfg = load_config(profile, overrides or [], store=store, stages=stages)
    return pipeline(config=cfg.model_dump(mode="json"))
