"""A stage that raises (rather than a killed process): the flow run is Failed, the run record names the stage
and the error, and retrying the run (the same flow run id and parameters, what `tracecore run --resume` and
the UI's retry do) resumes: finished stages are reused and the failed stage keeps its finished shards."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_PROFILE
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.registry import load_config


@pytest.mark.parametrize(("fault", "failed_stage"), [("tokenize:2", "tokenize"), ("after-pretrain:1", None)])
def test_stage_error_fails_the_run_and_a_retry_resumes(prefect_harness, tmp_path, monkeypatch, fault, failed_stage):
    from tracecore.flows.pipeline import pipeline

    cfg = load_config(str(TEST_PROFILE), [], store=str(tmp_path / "store"), stages=["ingest", "tokenize", "pretrain"])
    store = ArtifactStore(cfg.store)
    monkeypatch.setenv("TRACECORE_FAIL_AT", fault)
    state = pipeline(config=cfg.model_dump(mode="json"), run_id="r1", return_state=True)
    assert state.is_failed()
    record = json.loads(store.fs.open(f"{store.run_dir('r1')}/run.json").read())
    assert record["state"] == "failed"
    if failed_stage:
        assert record["stages"][failed_stage]["status"] == "failed"
        assert "injected failure in tokenize" in record["stages"][failed_stage]["error"]
    computed_before = {s for s, i in record["stages"].items() if i["status"] == "computed"}

    monkeypatch.delenv("TRACECORE_FAIL_AT")
    retried = pipeline(config=cfg.model_dump(mode="json"), run_id="r1", return_state=True)
    assert retried.is_completed()
    record = json.loads(store.fs.open(f"{store.run_dir('r1')}/run.json").read())
    assert record["state"] == "completed" and record["attempts"] == 2
    assert {s for s, i in record["stages"].items() if i["status"] == "reused"} == computed_before
    if failed_stage:
        tokens = record["stages"]["tokenize"]["refs"]["tokens"]
        assert store.manifest(tokens)["skipped_shards"] >= 2  # the shards finished before the error were kept
