"""A stage that raises (rather than a killed process): the flow run is Failed, the run record names the stage
and the error, and retrying the run (the same flow run id and parameters, what `tracecore run --resume` and
the UI's retry do) resumes: finished stages are reused and the failed stage keeps its finished shards."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_PROFILE
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.registry import load_config


@pytest.mark.parametrize(("fault", "failed_stage", "stages", "overrides"), [
    ("tokenize:2", "tokenize", ["ingest", "tokenize", "pretrain"], []),
    ("after-pretrain:1", None, ["ingest", "tokenize", "pretrain"], []),
    # concurrent branches: ngram fails while pretrain runs beside it; pretrain still finishes and is reused
    ("ngram-index:1", "ngram", ["ngram", "pretrain"], ["parallel_stages=4"])])
def test_stage_error_fails_the_run_and_a_retry_resumes(prefect_harness, tmp_path, monkeypatch, fault,
                                                       failed_stage, stages, overrides):
    from tracecore.flows.pipeline import pipeline

    cfg = load_config(str(TEST_PROFILE), overrides, store=str(tmp_path / "store"), stages=stages)
    store = ArtifactStore(cfg.store)
    monkeypatch.setenv("TRACECORE_FAIL_AT", fault)
    state = pipeline(config=cfg.model_dump(mode="json"), run_id="r1", return_state=True)
    assert state.is_failed()
    record = json.loads(store.fs.open(f"{store.run_dir('r1')}/run.json").read())
    assert record["state"] == "failed"
    if failed_stage:
        assert record["stages"][failed_stage]["status"] == "failed"
        assert f"injected failure in {fault.split(':')[0]}" in record["stages"][failed_stage]["error"]
    computed_before = {s for s, i in record["stages"].items() if i["status"] == "computed"}
    if failed_stage == "ngram":
        assert "pretrain" in computed_before  # the independent branch was not cut short by ngram's failure

    monkeypatch.delenv("TRACECORE_FAIL_AT")
    retried = pipeline(config=cfg.model_dump(mode="json"), run_id="r1", return_state=True)
    assert retried.is_completed()
    record = json.loads(store.fs.open(f"{store.run_dir('r1')}/run.json").read())
    assert record["state"] == "completed" and record["attempts"] == 2
    assert {s for s, i in record["stages"].items() if i["status"] == "reused"} == computed_before
    if failed_stage == "tokenize":
        tokens = record["stages"]["tokenize"]["refs"]["tokens"]
        assert store.manifest(tokens)["skipped_shards"] >= 2  # the shards finished before the error were kept
