"""Prefect flows: `pipeline` runs the stage graph on one Dask cluster per run; one flow per stage.

Flows only wire: plan every needed stage up front (refs are fingerprints), submit each stage's Prefect
task as soon as the stages it reads from have finished (`wait_for`), so independent branches overlap
(`ngram` beside `pretrain`; `memorization`, `gradients` and `preference` beside each other), and
record each stage's outcome in the run record. The runner (`tasks.runtime.stage.run_stage`) skips a stage
whose artifact is committed; Prefect's cache (keyed on the same refs) marks it Cached in the UI, and
`refresh_cache` is forced when the store lacks the artifact so the cache never points at missing data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any

from prefect import flow, task
from prefect.futures import wait
from tracecore.flows.plan import pipeline_refs, plan_pipeline
from tracecore.flows.report import write_report
from tracecore.flows.runtime import dask_cluster
from tracecore.storage.runs import RunRecorder, new_run_id, start_run, write_run
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.common import inject_fault
from tracecore.tasks.runtime.registry import STAGES, dependencies, load_config, stages_of, validate_config
from tracecore.tasks.runtime.stage import StagePlan, run_stage


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key: store + planned artifact refs, which already hash the stage config, the input
    fingerprints and the code version. Deliberately *not* the flow-run id, so a new run reuses work."""
    refs = {name: out["ref"] for name, out in parameters["plan"]["outputs"].items()}
    payload = json.dumps({"store": parameters["store_uri"], "refs": refs}, sort_keys=True)
    return "tracecore-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O and cluster hiccups; never retry bad input or bad config (they fail the same way again)."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except OSError as exc:
        return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))
    except Exception as exc:  # noqa: BLE001 - classifying, not swallowing: the task fails either way
        return type(exc).__name__ in {"CommClosedError", "KilledWorker", "FutureCancelledError"}
    return False


def execute(config: dict, plan: dict, store_uri: str, address: str | None = None,
            recorder: RunRecorder | None = None, reusable: bool = False) -> dict[str, str]:
    """One planned stage through the runner, its start/end/failure recorded in the run record. `reusable`: the
    flow found the stage's primary artifact committed and intact (the runner does not ask the store again)."""
    cfg = validate_config(config)
    stage = stages_of(cfg)[plan["stage"]]
    if recorder:
        recorder.started(stage.name)
    try:
        refs = run_stage(stage, getattr(cfg, stage.name), StagePlan.from_json(plan), store_uri, address,
                         reusable)
    except BaseException as exc:
        if recorder:
            recorder.failed(stage.name, exc)
        raise
    if recorder:
        recorder.finished(stage.name)
    inject_fault(f"after-{stage.name}", 1)
    return refs


@functools.lru_cache(maxsize=64)
def stage_task(name: str):
    """The coarse, cached, retried Prefect task of a stage (one per registered stage name)."""
    return task(execute, name=name, task_run_name=name, cache_key_fn=stage_cache_key, persist_result=True,
                retries=2, retry_delay_seconds=2, retry_condition_fn=is_transient, log_prints=True)


def preload_libraries() -> None:
    """Import transformers' auto classes once before stages start in threads: its lazy module resolves an
    attribute by importing a submodule, and two threads doing that at once can see it half-initialised
    (`ImportError: cannot import name 'AutoTokenizer'`, seen with pretrain and ngram starting together)."""
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PreTrainedTokenizerFast,
    )


def run_graph(cfg: Any, config: dict, address: str | None, selected: list[str] | None = None,
              recorder: RunRecorder | None = None) -> dict[str, str]:
    """Plan, then submit every stage with `wait_for` its upstream stages; raise the first failure."""
    store = ArtifactStore(cfg.store)
    plans = plan_pipeline(cfg, store, selected)
    graph, limit = dependencies(cfg), cfg.max_parallel_stages()
    preload_libraries()
    futures: dict[str, Any] = {}
    for name, plan in plans.items():
        primary = plan.primary.ref
        done_before = store.status(primary).reusable  # the run's one answer for it; else the runner repairs
        if recorder:
            recorder.planned(name, plan.refs, reused=done_before)
        wait_for = [futures[u] for u in graph[name]]
        # at most `limit` at once: wait for the stage `limit` places earlier
        if limit and len(futures) >= limit:
            wait_for.append(list(futures.values())[-limit])
        futures[name] = stage_task(name).with_options(refresh_cache=not done_before).submit(
            config, plan.to_json(), store.uri, address, recorder, done_before, wait_for=wait_for)
    wait(list(futures.values()))
    for future in futures.values():
        if future.state.is_failed() or future.state.is_crashed() or future.state.is_cancelled():
            future.result()  # raises the stage's own exception
    if recorder:
        recorder.settle()  # stages Prefect answered from its cache never ran the body: mark them reused
    return pipeline_refs(plans)


@functools.cache
def stage_flow(stage: str):
    """The Prefect flow that runs one stage (built-in or a profile's `extra_stages`) and whatever upstream
    artifacts it needs that are not in the store yet; one flow object per stage name."""

    @flow(name=f"tracecore-{stage}", log_prints=True)
    def stage_flow(config: dict, address: str | None = None) -> dict[str, str]:
        """Run one stage (and whatever upstream artifacts it needs that are not in the store yet)."""
        cfg = validate_config(config)
        with dask_cluster(cfg.dask, address) as addr:
            return run_graph(cfg, config, addr, [stage])

    return stage_flow


STAGE_FLOWS = {stage: stage_flow(stage) for stage in STAGES}  # the built-ins, for deployments


def everything_reused(cfg: Any, store: ArtifactStore) -> bool:
    """Every stage's primary output already committed and intact: the run will compute nothing, so there are
    no timings for a calibration to qualify (it would be most of a cached re-run's time)."""
    return all(store.status(plan.primary.ref).reusable for plan in plan_pipeline(cfg, store).values())


@flow(name="tracecore-pipeline", log_prints=True)
def pipeline(config: dict, run_id: str | None = None) -> dict[str, Any]:
    """The whole pipeline: the needed stages as a graph on one Dask cluster; returns refs + report path.

    `run_id` None (scheduled runs) = a new id; a given id re-uses that run record (resume)."""
    cfg = validate_config(config)
    run_id = run_id or new_run_id()
    store = ArtifactStore(cfg.store)
    record = start_run(store, run_id, cfg.model_dump(mode="json"))
    if cfg.calibrate and not everything_reused(cfg, store):
        from tracecore.flows.calibrate import calibrate, calibration_line

        record["calibration"] = calibrate()
        print(calibration_line(record["calibration"]))  # the run's first line (log_prints: also in Prefect)
    elif cfg.calibrate:
        record["calibration_skipped"] = "every stage reused: nothing was timed"
        print("calibration: skipped, every stage's output is already in the store (nothing to time)")
    recorder, started, refs = RunRecorder(store, record), time.perf_counter(), {}
    try:
        with dask_cluster(cfg.dask) as address:
            refs = run_graph(cfg, config, address, recorder=recorder)
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


def run_stages(cfg: Any, selected: list[str] | None = None, address: str | None = None) -> dict[str, str]:
    """Plan and run stages one after another in this process, without Prefect (tests, notebooks, debugging);
    returns every planned ref, stage-namespaced."""
    store, stages = ArtifactStore(cfg.store), stages_of(cfg)
    plans = plan_pipeline(cfg, store, selected)
    for name, plan in plans.items():
        run_stage(stages[name], getattr(cfg, name), plan, store.uri, address)
    return pipeline_refs(plans)


def execute_stage(stage: str, config: dict, address: str | None = None) -> dict[str, str]:
    """One stage from a config mapping (and the upstream stages it needs, reused when committed)."""
    return run_stages(validate_config(config), [stage], address)
