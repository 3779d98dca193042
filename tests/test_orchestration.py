"""Orchestration details users rely on: retry policy, per-stage flows, concurrent runs, make-sample."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import run_cli
from tracecore.flows.pipeline import is_transient
from tracecore.storage.store import ArtifactStore


@pytest.mark.parametrize(("exc", "retry"), [
    (OSError("connection reset"), True),
    (TimeoutError("slow object store"), True),
    (FileNotFoundError("gone"), False),
    (ValueError("bad input"), False),
    (type("KilledWorker", (Exception,), {})("worker died"), True),
])
def test_only_transient_failures_are_retried(exc, retry):
    from prefect.states import Failed

    assert is_transient(None, None, Failed(data=exc)) is retry


def test_single_stage_flow_computes_missing_upstream(prefect_harness, test_config):
    from tracecore.flows.pipeline import STAGE_FLOWS

    cfg = test_config()
    refs = STAGE_FLOWS["tokenize"](config=cfg.model_dump(mode="json"))
    store = ArtifactStore(cfg.store)
    assert {"sample.sample", "ingest.documents", "tokenize.tokens", "tokenize.tokenizer"} <= set(refs)
    assert all(store.is_committed(refs[k]) for k in ("sample.sample", "ingest.documents", "tokenize.tokens"))
    assert not any(a.startswith("model/") for a in store.list_artifacts())  # nothing downstream ran


def test_concurrent_runs_of_one_config_compute_once(test_config, tmp_path):
    from conftest import run_planned, stage_plan

    cfg = test_config()
    run_planned(cfg, "sample")
    plan = stage_plan(cfg, "ingest")

    errors: list[BaseException] = []

    def worker():
        try:
            run_planned(cfg, "ingest", plan)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert not errors
    store = ArtifactStore(cfg.store)
    manifest = store.manifest(plan.refs["documents"])
    assert manifest["rows"] == store.read_table(plan.refs["documents"]).num_rows > 0
    assert len(store.markers(plan.refs["documents"])) == manifest["shards"]
    ids = store.read_table(plan.refs["documents"]).column("id").to_pylist()
    assert len(ids) == len(set(ids))  # nothing written twice


def test_make_sample_cli(tmp_path):
    proc = run_cli("make-sample", "--out", str(tmp_path / "world"), "--set", "sample.filler_documents=50",
                   "--set", "sample.corpus_files=2")
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    copies = counts["near_duplicate_documents"]  # the tiny profile's near-copies, in a file of their own
    assert copies and counts["corpus_documents"] == 50 + copies
    assert len(list((tmp_path / "world/corpus").glob("part-0*.jsonl.gz"))) == 2


def test_cli_rejects_bad_config_before_work(tmp_path):
    proc = run_cli("run", "--store", str(tmp_path / "s"), "--set", "pretrain.device=tpu")
    assert proc.returncode == 2
    assert "pretrain.device: must be one of 'auto', 'cpu' or 'cuda'" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_torch_threads_are_capped_at_the_cpus_the_process_may_use():
    """`threads: 2` on a one-CPU machine (taskset, a 1-CPU container) would put two threads on one core."""
    import subprocess
    import sys

    code = ("import os, torch; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from tracecore.tasks.runtime.common import set_torch_threads; set_torch_threads(2); "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "1", out
