"""The store on a real S3 API (SeaweedFS on loopback) with a Dask cluster started from the `dask` command
line:
the reduced case of `make test-cluster` (one stage and its upstream, ~1 minute)."""

from __future__ import annotations

import json

import pytest
from cluster_components import dask_cluster, seaweedfs
from conftest import TEST_PROFILE, run_cli


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as env:
        yield env


def store_fs(env):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                             secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


def test_a_stage_runs_on_s3_with_a_cli_started_dask_cluster(s3, tmp_path):
    import pandas as pd

    env = {k: v for k, v in s3.items() if k != "bucket"}
    store = f"s3://{s3['bucket']}/reduced"
    with dask_cluster(tmp_path / "dask", workers=2, env=env) as (address, _):
        run = run_cli("run", "--profile", str(TEST_PROFILE), "--store", store, "--stages", "tokenize",
                      "--dask-address", address, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    status = run_cli("status", "--store", store, "--json", env=env)
    record = json.loads(status.stdout)
    assert record["state"] == "completed"
    rows = record["rows"]
    assert {r["stage"] for r in rows if r["committed"]} >= {"sample", "ingest", "tokenize"}
    fs = store_fs(s3)
    tokens = next(r for r in rows if r["output"] == "tokens")["artifact"]
    folder = f"{s3['bucket']}/reduced/artifacts/{tokens}"
    manifest = json.loads(fs.cat(f"{folder}/_MANIFEST.json"))
    assert manifest["shards"] == len(fs.glob(f"{folder}/part-*.parquet")) == 6
    # the artifact folder is a plain Parquet dataset on S3, readable as the README says
    table = pd.read_parquet(f"s3://{folder}/", storage_options={
        "endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"], "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"]})
    assert len(table) == next(r for r in rows if r["output"] == "tokens")["rows"] > 0
