"""Real cluster components on 127.0.0.1, started and stopped by the tests: SeaweedFS (S3), a Dask scheduler
and workers from the `dask` command line, a Prefect server. Each is a context manager that waits until the
component answers and stops it (SIGTERM, then SIGKILL) on exit; ports are picked free."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "tracecore", "AWS_SECRET_ACCESS_KEY": "tracecore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def start(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A component in its own process group (so stopping it takes its children too)."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def weed_binary() -> str | None:
    return shutil.which("weed", path=str(BIN)) or shutil.which("weed")


@contextlib.contextmanager
def seaweedfs(workdir: Path, bucket: str = "tracecore") -> Iterator[dict]:
    """`weed server -s3` on loopback; yields the environment a store client needs (endpoint + credentials
    from the environment, never from a profile) with the bucket created."""
    names = ("s3", "master", "volume", "filer")
    # every HTTP port and its gRPC port chosen, none default
    ports = dict(zip(names, free_ports(2 * len(names))))
    data = workdir / "weed-data"
    data.mkdir(parents=True, exist_ok=True)
    grpc = dict(zip(names, free_ports(len(names))))
    proc = start([weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
                  *(f"-{n}.port={ports[n]}" for n in names), *(f"-{n}.port.grpc={grpc[n]}" for n in names),
                  "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0"], workdir, workdir / "weed.log")
    env = {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}"}
    try:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], key=S3_ENV["AWS_ACCESS_KEY_ID"],
                               secret=S3_ENV["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)

        def bucket_ready() -> bool:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            fs.pipe(f"{bucket}/.probe", b"ok")
            return fs.cat(f"{bucket}/.probe") == b"ok"

        wait_until(bucket_ready, 90, "SeaweedFS S3")
        yield {**env, "bucket": bucket}
    finally:
        stop(proc, grace=3)  # it stops slowly on SIGTERM; its data is a temporary folder


@contextlib.contextmanager
def dask_cluster(workdir: Path, workers: int, env: dict | None = None,
                 worker_env: dict | None = None) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """`dask scheduler` and `workers` x `dask worker` (one process, one thread each), started from the command
    line in `workdir`; yields (address, worker processes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    common = ["--dashboard-address", "127.0.0.1:0"]
    procs = [start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), *common],
                   workdir, workdir / "scheduler.log", env)]
    try:
        for i in range(workers):
            procs.append(start([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                "--host", "127.0.0.1", "--name", f"w{i}", "--no-nanny", *common], workdir,
                               workdir / f"worker-{i}.log", {**(env or {}), **(worker_env or {})}))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=90)
        yield address, procs[1:]
    finally:
        for proc in reversed(procs):
            stop(proc)


@contextlib.contextmanager
def prefect_server(workdir: Path, env: dict | None = None) -> Iterator[dict]:
    """`tracecore ui --port N` (a Prefect server + UI on loopback, N != 4200) with its own PREFECT_HOME;
    yields the environment that points clients at it."""
    port = free_port()
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    server_env = {**(env or {}), "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = start([str(BIN / "tracecore"), "ui", "--port", str(port)], workdir, workdir / "prefect-server.log",
                 server_env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 120,
                   "Prefect server")
        yield {**server_env, "PREFECT_API_URL": api, "port": str(port)}
    finally:
        stop(proc, grace=15)
