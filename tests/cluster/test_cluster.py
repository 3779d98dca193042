"""`make test-cluster`: the flows past one machine, with real components on 127.0.0.1 (issue 19).

SeaweedFS as the S3 store, a Dask scheduler and workers started from the `dask` command line in another
working directory, a Prefect server with a process work pool and a worker. Opt-in (TRACECORE_CLUSTER=1, set by
the make target): ~5 minutes on 2 cores. `tests/test_object_store.py` is the reduced case `make test` runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from cluster_components import dask_cluster, seaweedfs, start, stop, wait_until
from conftest import REPO, TEST_PROFILE, run_cli

pytestmark = pytest.mark.skipif(os.environ.get("TRACECORE_CLUSTER") != "1",
                                reason="cluster suite: `make test-cluster` (TRACECORE_CLUSTER=1)")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as env:
        yield env


def client_env(s3: dict) -> dict:
    return {k: v for k, v in s3.items() if k != "bucket"}


def s3fs_of(s3: dict):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3["FSSPEC_S3_ENDPOINT_URL"], key=s3["AWS_ACCESS_KEY_ID"],
                             secret=s3["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)


def committed_artifacts(store_uri: str, env: dict, run_id: str | None = None) -> dict[str, dict]:
    """artifact -> {shard: checksum} of every committed artifact of a run (from `tracecore artifacts
    --json`)."""
    out = run_cli("status", "--store", store_uri, "--json", *([run_id] if run_id else []), env=env)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    return {r["artifact"]: r for r in rows if r["committed"]}


def shard_checksums(fs, folder: str) -> dict[str, str]:
    """Every shard marker's checksum, and a check that the bytes it names are complete."""
    import hashlib

    sums = {}
    fs.invalidate_cache()  # listings written by other processes since this client last looked
    for path in fs.glob(f"{folder}/_markers/*.json"):
        marker = json.loads(fs.cat(path))
        data = fs.cat(f"{folder}/{marker['file']}")
        assert hashlib.sha256(data).hexdigest() == marker["checksum"], path  # no partial shard is visible
        sums[marker["file"]] = marker["checksum"]
    return sums


def test_a_killed_dask_worker_mid_stage_loses_no_shard(s3, tmp_path):
    """Two CLI-started workers, each shard slowed to 1 s on them; worker 0 is SIGKILLed once tokenize has
    committed its first shard. The run finishes on worker 1 and every shard is in the output exactly once."""
    env, store = client_env(s3), f"s3://{s3['bucket']}/worker-loss"
    fs = s3fs_of(s3)
    with dask_cluster(tmp_path / "dask", workers=2, env=env, worker_env={"TRACECORE_SHARD_DELAY_S": "1"}) as (
            address, workers):
        run = start([str(REPO / ".venv/bin/tracecore"), "run", "--profile", str(TEST_PROFILE), "--store",
                     store,
                     "--stages", "tokenize", "--dask-address", address], REPO, tmp_path / "run.log", env)
        wait_until(lambda: fs.glob(f"{s3['bucket']}/worker-loss/artifacts/tokens/*/_markers/*.json"), 240,
                   "the first tokenize shard")
        os.killpg(workers[0].pid, signal.SIGKILL)
        assert run.wait(300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert workers[0].poll() is not None  # the worker really died
    artifacts = committed_artifacts(store, env)
    tokens = next(r for r in artifacts.values() if r["output"] == "tokens")
    documents = next(r for r in artifacts.values() if r["output"] == "documents")
    assert len(shard_checksums(fs, f"{s3['bucket']}/worker-loss/artifacts/{tokens['artifact']}")) == 6
    import pandas as pd

    opts = {"endpoint_url": s3["FSSPEC_S3_ENDPOINT_URL"], "key": s3["AWS_ACCESS_KEY_ID"],
            "secret": s3["AWS_SECRET_ACCESS_KEY"]}
    ids = pd.read_parquet(f"s3://{s3['bucket']}/worker-loss/artifacts/{tokens['artifact']}/",
                          storage_options=opts)
    assert ids["doc_id"].is_unique and len(ids) == documents["rows"]


def test_two_runs_of_one_config_on_one_s3_store_end_identical(s3, tmp_path):
    """No lock across hosts on an object store: two runs of the same config race, write the same
    content-addressed artifacts with identical bytes (deterministic shards, one PUT each, marker after the
    data, manifest last), and end with the same artifacts as a run on a local disk."""
    env, store = client_env(s3), f"s3://{s3['bucket']}/twice"
    args = ["run", "--profile", str(TEST_PROFILE), "--store", store, "--stages", "trace"]
    procs = [start([str(REPO / ".venv/bin/tracecore"), *args], REPO, tmp_path / f"run{i}.log", env)
             for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(600) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
    local = tmp_path / "local-store"
    assert run_cli("run", "--profile", str(TEST_PROFILE), "--store", str(local), "--stages", "trace",
                   env=env).returncode == 0
    on_s3, on_disk = committed_artifacts(store, env), committed_artifacts(str(local), env)
    assert on_s3.keys() == on_disk.keys()
    fs = s3fs_of(s3)
    from fsspec.implementations.local import LocalFileSystem

    for artifact in on_s3:  # every shard of both runs' artifacts is complete (checksum = marker)
        shard_checksums(fs, f"{s3['bucket']}/twice/artifacts/{artifact}")
    # tables without file paths in them are byte-identical to the local run's (paths name s3:// vs file://)
    path_free = [a for a in on_s3 if a.split("/")[0] in {"tokens", "ngram_counts", "ngram_topk", "ngram_map"}]
    assert len(path_free) == 4
    for artifact in path_free:
        assert shard_checksums(fs, f"{s3['bucket']}/twice/artifacts/{artifact}") == \
            shard_checksums(LocalFileSystem(), f"{local}/artifacts/{artifact}"), artifact
    records = [json.loads(fs.cat(p)) for p in fs.glob(f"{s3['bucket']}/twice/runs/*/run.json")]
    assert len(records) == 2 and all(r["state"] == "completed" for r in records)
    refs = [{s: i.get("refs") for s, i in r["stages"].items()} for r in records]
    assert refs[0] == refs[1]  # the same content-addressed artifacts, planned and committed by both


# ---- Prefect: a server, a process work pool, `prefect deploy`, a worker -----------------------------------
def api(env: dict, method: str, path: str, body: dict | None = None):
    import urllib.request

    request = urllib.request.Request(env["PREFECT_API_URL"] + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def prefect_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([str(REPO / ".venv/bin/prefect"), *args], cwd=REPO, env={**os.environ, **env},
                         check=False, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def flow_run_state(env: dict, run_id: str) -> str:
    return api(env, "GET", f"/flow_runs/{run_id}")["state"]["type"]


def parent_run(env: dict, flow_run_id: str | None) -> str | None:
    """The flow run a subflow run belongs to (`run_profile` runs the pipeline flow as a subflow)."""
    if not flow_run_id:
        return None
    parent_task = api(env, "GET", f"/flow_runs/{flow_run_id}").get("parent_task_run_id")
    return api(env, "GET", f"/task_runs/{parent_task}")["flow_run_id"] if parent_task else flow_run_id


def flow_run_pid(run_id: str) -> int | None:
    """The process a process worker started for a flow run (it carries the run id in its environment)."""
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/environ", "rb") as fh:
                    if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in fh.read():
                        return int(proc)
            except OSError:
                continue
    return None


def test_a_work_pool_worker_runs_the_deployment_and_a_new_run_resumes_after_a_kill(s3, tmp_path):
    from cluster_components import prefect_server

    store = f"s3://{s3['bucket']}/prefect"
    with prefect_server(tmp_path / "server", client_env(s3)) as server:
        env = {**client_env(s3), "PREFECT_API_URL": server["PREFECT_API_URL"],
               "PREFECT_HOME": server["PREFECT_HOME"], "TRACECORE_HOME": str(REPO)}
        prefect_cli(env, "work-pool", "create", "tracecore-test", "--type", "process")
        prefect_cli(env, "deploy", "--prefect-file", str(REPO / "prefect.yaml"), "--name",
                    "tracecore-on-demand", "--pool", "tracecore-test",
                    "--params",
                    json.dumps({"profile": str(TEST_PROFILE), "store": store, "stages": ["tokenize"]}))
        worker = start([str(REPO / ".venv/bin/prefect"), "worker", "start", "--pool", "tracecore-test"], REPO,
                       tmp_path / "worker.log", {**env, "TRACECORE_SHARD_DELAY_S": "1"})
        try:
            deployment = api(env, "GET", "/deployments/name/tracecore-profile/tracecore-on-demand")
            first = api(env, "POST", f"/deployments/{deployment['id']}/create_flow_run", {})["id"]
            fs = s3fs_of(s3)

            def first_tokens_shard() -> bool:
                fs.invalidate_cache()
                return bool(fs.glob(f"{s3['bucket']}/prefect/artifacts/tokens/*/_markers/*.json"))

            wait_until(first_tokens_shard, 300, "the first tokenize shard of the worker's run")
            os.kill(flow_run_pid(first), signal.SIGKILL)  # the worker's flow-run process, mid-stage
            wait_until(lambda: flow_run_state(env, first) in {"CRASHED", "FAILED"}, 120,
                       "the killed run's state")
            second = api(env, "POST", f"/deployments/{deployment['id']}/create_flow_run", {})["id"]
            wait_until(lambda: flow_run_state(env, second) == "COMPLETED", 300, "the second run")
            keys = {a["key"] for a in api(env, "POST", "/artifacts/filter", {})
                    if parent_run(env, a["flow_run_id"]) == second}
        finally:
            stop(worker)
    assert "tracecore-pipeline-summary" in keys and "tracecore-tokenize-outputs" in keys
    fs.invalidate_cache()
    records = [json.loads(fs.cat(p)) for p in fs.glob(f"{s3['bucket']}/prefect/runs/*/run.json")]
    resumed = next(r for r in records if r["state"] == "completed")
    assert resumed["stages"]["sample"]["status"] == "reused"
    assert resumed["stages"]["ingest"]["status"] == "reused"
    tokens = resumed["stages"]["tokenize"]["refs"]["tokens"]
    assert len(shard_checksums(fs, f"{s3['bucket']}/prefect/artifacts/{tokens}")) == 6


# ---- the UI, in a real browser -----------------------------------------------------------------------------
def rendered(url: str, chromium: str, budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran (headless Chromium)."""
    out = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          # else logs unrendered
                          "--window-size=1280,900", "--run-all-compositor-stages-before-draw",
                          f"--virtual-time-budget={budget_ms}", "--dump-dom", url], capture_output=True,
                          text=True,
                         timeout=120, check=False)
    return out.stdout


def test_the_ui_on_another_port_shows_the_run_its_stages_and_an_inline_plot(tmp_path):
    import shutil

    from cluster_components import prefect_server

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("needs Debian's `chromium` (apt-get install chromium)")
    with prefect_server(tmp_path / "server") as server:
        env = {"PREFECT_API_URL": server["PREFECT_API_URL"]}
        run = run_cli("run", "--profile", str(TEST_PROFILE), "--store", str(tmp_path / "store"), "--stages",
                      "trace", env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        run_id = run.stdout.split("tracecore run ", 1)[1].split(":", 1)[0]
        flow_run = api(env, "POST", "/flow_runs/filter",
                       {"flow_runs": {"name": {"any_": [f"tracecore-{run_id}"]}}})[0]
        base = f"http://127.0.0.1:{server['port']}"
        page = rendered(f"{base}/runs/flow-run/{flow_run['id']}", chromium)
        assert "Can't connect to Server API" not in page
        # each stage's task run, in its log rows
        for stage in ("sample", "ingest", "tokenize", "ngram", "trace"):
            assert f">{stage}<" in page, stage
        assert "trace qa: " in page  # a stage's own log line, as the UI shows it
        plot = next(a for a in api(env, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {
            "any_": [flow_run["id"]]}, "type": {"any_": ["markdown"]}}})
                if "data:image/png" in (a.get("data") or ""))
        artifact_page = rendered(f"{base}/artifacts/artifact/{plot['id']}", chromium)
        assert 'src="data:image/png;base64,' in artifact_page
