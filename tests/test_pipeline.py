"""The Prefect pipeline on Dask: end to end, cached re-runs, an external cluster, SIGKILL + resume."""

from __future__ import annotations

import json

import pytest
from conftest import reduced_sets, run_cli
from tracecore.storage.store import ArtifactStore


def test_pipeline_end_to_end_then_fully_cached(pipeline_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from tracecore.flows.pipeline import pipeline
    from tracecore.tasks.models import model_dir
    from transformers import AutoModelForCausalLM

    cfg, store, first, record = pipeline_run.cfg, pipeline_run.store, pipeline_run.result, pipeline_run.record
    assert record["state"] == "completed"
    from tracecore.tasks.runtime.registry import STAGES

    assert {s: i["status"] for s, i in record["stages"].items()} == dict.fromkeys(STAGES, "computed")
    report = (store.fs.open(first["report"]).read()).decode()
    assert "| tokenize | tokens/" in report and "pretrain_loss.png" in report
    manifest = store.manifest(first["refs"]["pretrain.model"])
    assert manifest["eval_loss"] < manifest["eval_loss_initial"]  # the bootstrap model learned something
    with model_dir(store, first["refs"]["pretrain.model"]) as folder:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.config.model_type == "llama" and model.num_parameters() == manifest["parameters"]

    state = pipeline(config=cfg.model_dump(mode="json"), run_id="run-b", return_state=True)
    second = state.result()
    assert second["refs"] == first["refs"]
    record = json.loads(store.fs.open(f"{store.run_dir('run-b')}/run.json").read())
    assert {i["status"] for i in record["stages"].values()} == {"reused"}
    with get_client(sync_client=True) as client:
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=run_filter)
    assert sorted(r.state.name for r in runs) == ["Cached"] * len(STAGES)
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["tracecore-pipeline-summary", "tracecore-tokenize-outputs", "tracecore-memorization-scores",
            "tracecore-pretrain-loss", "tracecore-memorization-rho-by-task", "tracecore-select-cluster-sizes",
            "tracecore-finetune-finetune-loss", "tracecore-eval-verdict", "tracecore-eval-quality",
            "tracecore-eval-needle-heatmaps", "tracecore-eval-retrieval-heads", "tracecore-finetune-outputs",
            "tracecore-pretrain-progress", "tracecore-finetune-progress", "tracecore-eval-quality-progress"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in found} == set(keys)
    # this test's run (shared server)
    summary = next(a for a in found if a.key == "tracecore-pipeline-summary"
                   and a.flow_run_id == state.state_details.flow_run_id)
    assert "memorization_scores" in summary.data


def test_a_cached_rerun_reads_no_artifact_data(pipeline_run, monkeypatch):
    """A fully cached re-run answers "done and intact" from manifests, markers and file listings: it opens no
    Parquet file and hashes no file (it used to checksum every reused artifact's bytes, and the report re-read
    every table it shows); an artifact written before stamps existed would still be hashed."""
    import fsspec.implementations.local as local
    import tracecore.storage.store as store_module
    from tracecore.flows.pipeline import pipeline

    opened, hashed = [], []
    real_open = local.LocalFileSystem._open
    monkeypatch.setattr(local.LocalFileSystem, "_open",
                        lambda self, path, *a, **k: opened.append(str(path))
                            or real_open(self, path, *a, **k))
    monkeypatch.setattr(store_module, "file_checksum", lambda fs, path, *a: hashed.append(path) or "")
    import tracecore.flows.calibrate as calibrate_module

    calibrated, real_calibrate = [], calibrate_module.calibrate
    monkeypatch.setattr(calibrate_module, "calibrate", lambda: calibrated.append(1) or real_calibrate())
    pipeline(config=pipeline_run.cfg.model_dump(mode="json") | {"calibrate": True}, run_id="run-cached-reads")
    assert not [p for p in opened if p.endswith(".parquet")] and not hashed
    assert any(p.endswith("_MANIFEST.json") for p in opened)  # it did look: through the manifests
    # nothing computed, so nothing to calibrate (its ~3 s were most of a cached re-run); failed on the old
    # code
    store = pipeline_run.store
    record = json.loads(store.fs.open(f"{store.run_dir('run-cached-reads')}/run.json").read())
    assert not calibrated and "calibration" not in record and record["calibration_skipped"]


def test_stage_runs_on_an_existing_cluster_by_address(prefect_harness, test_config):
    from distributed import LocalCluster
    from tracecore.flows.pipeline import pipeline

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        cfg = test_config("dask.address=" + cluster.scheduler_address, "stages=[sample,ingest,tokenize]")
        result = pipeline(config=cfg.model_dump(mode="json"), run_id="by-address")
        prefixes = set(cluster.scheduler.task_prefixes)
    assert {"ingest-parsed", "ingest", "tokenize"} <= prefixes, prefixes  # each pass ran on that cluster
    assert ArtifactStore(cfg.store).is_committed(result["refs"]["tokenize.tokens"])


@pytest.mark.slow
def test_cli_end_to_end_status_and_artifacts(tmp_path):
    store = str(tmp_path / "store")
    proc = run_cli("run", "--profile", "tiny", "--stages", "ingest,tokenize,pretrain", "--store", store,
                   *reduced_sets())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and "report.md" in proc.stdout
    status = json.loads(run_cli("status", "--store", store, "--json").stdout)
    assert status["state"] == "completed"
    by_artifact = {r["artifact"].split("/")[0]: r for r in status["rows"]}
    assert by_artifact["tokens"]["committed"] and by_artifact["tokens"]["on_rerun"] == "skip"
    assert by_artifact["documents"]["rows"] > 0 and by_artifact["model"]["committed"]
    listing = run_cli("artifacts", "--store", store)
    assert listing.returncode == 0 and "tokens/" in listing.stdout
    profile = tmp_path / "mine.yaml"  # status / artifacts read the profile's store, as `run` does
    profile.write_text(f"extends: tiny\nstore: {store}\n")
    by_profile = json.loads(run_cli("status", "--profile", str(profile), "--json").stdout)
    assert by_profile["run_id"] == status["run_id"]


def test_status_of_a_missing_store_is_an_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "no-store"
    for command in ("status", "artifacts", "readme"):
        proc = run_cli(command, "--store", str(missing))
        assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
    assert not missing.exists()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_pretrain_epochs_and_schedule(schedule):
    """`epochs` passes over the blocks (capped by max_tokens); a constant rate stays at `lr` after warm-up,
    a cosine one decays towards zero."""
    import logging

    import numpy as np
    from tracecore.configs.schema import PretrainConfig
    from tracecore.tasks.lm_training import build_model, train

    cfg = PretrainConfig(hidden_size=16, layers=1, heads=1, kv_heads=1, intermediate_size=16, seq_len=16,
                         batch_size=2, warmup_steps=20, epochs=2, lr=0.01, schedule=schedule)
    blocks = np.random.default_rng(0).integers(0, 30, size=(20, 16))
    curve = train(build_model(cfg, 32, 0, 1), blocks, cfg, "cpu", logging.getLogger("test"))
    assert len(curve) == 2 * blocks.size // (2 * 16)  # 20 steps; warm-up capped at a tenth of them
    after_warmup = [c["lr"] for c in curve[2:]]
    if schedule == "constant":
        assert after_warmup == pytest.approx([0.01] * len(after_warmup))
    else:
        assert after_warmup[-1] < 0.001 and after_warmup[0] > 0.009
    assert len(train(build_model(cfg, 32, 0, 1), blocks, cfg.model_copy(update={"max_tokens": 160}), "cpu",
                     logging.getLogger("test"))) == 5  # max_tokens caps the epochs


def test_local_cluster_workers_keep_glibc_malloc_defaults(monkeypatch):
    """Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers, which made numpy-heavy stages ~25 %
    slower (every large temporary page-faulted afresh); our LocalCluster leaves glibc's default unless the
    config names a value."""
    import os

    from distributed import Client
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.runtime import dask_cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_cluster(DaskConfig(n_workers=1)) as address, Client(address) as client:
        assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [None]


def worker_bookkeeping(dask_worker) -> dict:
    """What a worker process runs besides its tasks: its periodic callbacks' intervals (ms) by name."""
    return {name: pc.callback_time for name, pc in dask_worker.periodic_callbacks.items()}


@pytest.mark.parametrize("monitoring", ["light", "dask"])
def test_local_cluster_monitoring_setting_reaches_workers_and_scheduler(monitoring):
    """Dask's defaults wake every worker's and the scheduler's event loop every 20 ms (tick), sample the task
    thread's stack every 10 ms (profiler) and read memory every 100 ms; measured on 2 cores, CPU-bound shards
    ran ~10 % slower than in a plain process pool. `light` (our default) slows that bookkeeping down, `dask`
    leaves Dask's own."""
    from distributed import Client
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.runtime import dask_cluster

    cfg = DaskConfig(n_workers=1) if monitoring == "light" else DaskConfig(n_workers=1, monitoring=monitoring)
    with dask_cluster(cfg) as address, Client(address) as client:
        (worker,) = client.run(worker_bookkeeping).values()
        scheduler = client.run_on_scheduler(worker_bookkeeping)
    light = monitoring == "light"
    assert ("profile" in worker) is not light
    assert worker["tick"] == scheduler["tick"] == (1000 if light else 20)
    assert worker["monitor"] == (5000 if light else 500)
    assert worker["memory_monitor"] == (1000 if light else 100)
