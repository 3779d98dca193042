"""SIGKILL of the whole run (process group, Dask workers included) at stage boundaries and mid-stage,
then `tracecore run --resume`: the run completes and the final artifacts equal an uninterrupted run's
(tokens byte-identical by checksum; documents/rejects row-for-row, minus the input path column, which
points into each store), with no duplicated or lost rows."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_PROFILE, run_cli

from storage.store import ArtifactStore

pytestmark = pytest.mark.slow
COMMON = ["--profile", str(TEST_PROFILE), "--stages", "ingest,tokenize", "--set", "dask.processes=true"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("clean") / "store")
    assert run_cli("run", *COMMON, "--store", store).returncode == 0
    status = json.loads(run_cli("status", "--store", store, "--json").stdout)
    return ArtifactStore(store), {r["artifact"].split("/")[0]: r["artifact"] for r in status["rows"]}


@pytest.mark.parametrize("fault", ["after-sample:1", "after-ingest:1", "ingest:1"])
def test_kill_then_resume_matches_uninterrupted(clean, tmp_path, fault):
    clean_store, refs = clean
    store = str(tmp_path / "store")
    proc = run_cli("run", *COMMON, "--store", store, env={"TRACECORE_KILL_AT": fault})
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_id = json.loads(run_cli("status", "--store", store, "--json").stdout)["run_id"]
    resumed = run_cli("run", "--resume", run_id, "--store", store)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    killed = ArtifactStore(store)
    assert killed.manifest(refs["tokens"])["checksum"] == clean_store.manifest(refs["tokens"])["checksum"]
    for name in ("documents", "rejects"):  # these record the input file's path, which is inside each store
        columns = [c for c in killed.read_table(refs[name]).column_names if c != "file"]
        assert killed.read_table(refs[name], columns=columns).equals(clean_store.read_table(refs[name], columns=columns))
    ids = killed.read_table(refs["tokens"], columns=["doc_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids))
