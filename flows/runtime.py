"""Process-level set-up: offline environment, Prefect result storage, the run's Dask cluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from tracecore.configs.base import DaskConfig

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_environment(store_uri: str | None = None) -> None:
    """Call before importing Prefect: nothing reaches the network, results persist next to the store.

    Values the user already exported win (e.g. PREFECT_API_URL for a real server).
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if store_uri and "://" not in store_uri:
        os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH",
                              os.path.join(os.path.abspath(store_uri), "prefect-results"))


# the variables a Nanny sets before spawning its worker; a None value unsets one (distributed.nanny)
MALLOC_TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
# `dask.monitoring: light`: Dask's periodic bookkeeping, slowed down (see DaskConfig.monitoring for the
# measurement)
LIGHT_MONITORING = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def local_cluster_settings(cfg: DaskConfig) -> dict:
    """Dask config for the LocalCluster this run starts: its scheduler reads it here, and each Nanny hands it
    to
    the worker process it spawns."""
    return {MALLOC_TRIM_KEY: cfg.malloc_trim_threshold,
            **(LIGHT_MONITORING if cfg.monitoring == "light" else {})}


@contextmanager
def dask_cluster(cfg: DaskConfig, address: str | None = None) -> Iterator[str]:
    """Yield a scheduler address: the user's cluster, or a LocalCluster bound to loopback for this run."""
    address = address or cfg.address
    if address:
        from distributed import Client

        with Client(address, timeout="20s", set_as_default=False):  # fail early with a clear error
            pass
        yield address
        return
    import dask
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # after Prefect's logging set-up
    with dask.config.set(local_cluster_settings(cfg)), \
            LocalCluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker,
                         processes=cfg.processes, memory_limit=cfg.memory_limit, dashboard_address=None,
                         host="127.0.0.1" if cfg.processes else None,  # threads use in-process comms
                         silence_logs=logging.WARNING) as cluster:
        yield cluster.scheduler_address
