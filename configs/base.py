"""The run-wide configuration: `PipelineBase` (store, Dask, concurrency), the strict base model every stage's
config extends, and the one configuration error type."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """An invalid configuration; the message names the field(s)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint(self) -> str:
        """Stable hash of the settings; part of every artifact fingerprint."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"),
                                         sort_keys=True).encode()).hexdigest()[:16]


class DaskConfig(Strict):
    address: str | None = Field(None, description="existing scheduler, e.g. tcp://host:8786")
    n_workers: int = Field(2, ge=1, le=1024)
    threads_per_worker: int = Field(1, ge=1, le=256)
    processes: bool = True
    memory_limit: str = "auto"
    malloc_trim_threshold: int | None = Field(None, ge=0, description=(
        "glibc's MALLOC_TRIM_THRESHOLD_ in the LocalCluster's worker processes; None = glibc's own, as in "
        "any Python process. Dask sets 65536 so that workers hand freed memory back at once, which also "
        "fixes glibc's mmap threshold at 128 KiB: every numpy/Arrow buffer above it is then fresh pages "
        "faulted in on each use (docs/development/decisions.md). An existing cluster's workers take it from "
        "their own Dask config (docs/guides/cluster.md)"))
    monitoring: Literal["light", "dask"] = Field("light", description=(
        "the LocalCluster's own bookkeeping. light: each process's event-loop tick every 1 s (Dask: 20 ms), "
        "no worker profiler (Dask: a stack sample of the task thread every 10 ms), system monitor every 5 s "
        "(500 ms), worker memory monitor every 1 s (100 ms): Dask's ticks cost a share of a small machine's "
        "throughput (docs/development/decisions.md). dask: Dask's defaults (its dashboard's profile and "
        "system pages need them). An existing cluster's processes take these from their own Dask config "
        "(docs/guides/cluster.md)"))


class PipelineBase(Strict):
    """Run-wide settings; `tracecore.tasks.runtime.registry` adds one section per registered stage and
    `stages`."""

    profile: str = "tiny"
    store: str = ".tracecore/store"
    calibrate: bool = Field(True, description="measure the machine (fp32 matmul GFLOP/s, BPE tokens/s; ~3 s) "
                            "at the start of a run and record it beside the stage timings, which differ ~2x "
                            "between same-size machines")
    extra_stages: list[str] = Field(default_factory=list, description=(
        "modules of your own stages (each defines STAGE = tracecore.tasks.runtime.stage.Stage(...)), run "
        "after the built-in ones"))
    parallel_stages: int | None = Field(None, ge=1, description=(
        "stages running at once; None = auto: unbounded when Dask runs in worker processes or on a cluster, "
        "1 when it runs as threads in this process (dask.processes: false), where concurrent stages would "
        "share torch's process-global RNG and thread count and their results would depend on scheduling"))
    dask: DaskConfig = Field(default_factory=DaskConfig)

    def max_parallel_stages(self) -> int | None:
        """The effective bound (None = unbounded)."""
        if self.parallel_stages is not None:
            return self.parallel_stages
        return None if (self.dask.processes or self.dask.address) else 1

    def stage_config(self, stage: str) -> Strict:
        return getattr(self, stage)
