"""Shared fixtures: offline environment, a reduced test profile, a Prefect test harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_PROFILE = REPO / "tests" / "profile_test.yaml"

os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "DO_NOT_TRACK": "1", "TRACECORE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


HAS_CUDA = _cuda()
if not HAS_CUDA:  # Triton kernels run through Triton's CPU interpreter; must be set before `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")
def gpu(test):
    """Marks a test `gpu` (selected by `pytest -m gpu`, as bench/gpu_check.sh does) and skips it without
    CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def test_config(tmp_path):
    """The reduced profile with a fresh store and in-process (threaded) Dask."""
    from tracecore.tasks.runtime.registry import load_config

    def make(*overrides: str, store: Path | None = None):
        return load_config(str(TEST_PROFILE), list(overrides), store=str(store or tmp_path / "store"))

    return make


def run_cli(*args: str, env: dict | None = None, timeout: float = 600,
            **kwargs) -> subprocess.CompletedProcess:
    """Run `tracecore ...` in a subprocess in its own session (so SIGKILL of the group spares pytest)."""
    full_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # default: no server
    full_env.update(env or {})  # a test may point the run at a server (PREFECT_API_URL)
    return subprocess.run([sys.executable, "-m", "tracecore.flows.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, check=False,
                          text=True, timeout=timeout, start_new_session=True, **kwargs)


def reduced_sets() -> list[str]:
    """The test profile as `--set` overrides, to run the real `tiny` profile on a reduced sample."""
    import yaml

    args = []
    for section, values in yaml.safe_load(TEST_PROFILE.read_text()).items():
        if isinstance(values, dict):
            args += [x for key, value in values.items()
                     for x in ("--set", f"{section}.{key}={json.dumps(value)}")]
        elif section != "store":  # top-level settings (calibrate)
            args += ["--set", f"{section}={json.dumps(values)}"]
    return args


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """The reduced sample world through pretrain (a tiny Llama), shared by the stage tests."""
    from tracecore.flows.pipeline import execute_stage
    from tracecore.tasks.runtime.registry import load_config

    store = str(tmp_path_factory.mktemp("pretrained") / "store")
    cfg = load_config(str(TEST_PROFILE), [], store=store)
    config, refs = cfg.model_dump(mode="json"), {}
    for stage in ("sample", "ingest", "tokenize", "pretrain"):
        refs.update(execute_stage(stage, config))
    return cfg, refs


def with_section(cfg, section: str, **overrides):
    """A copy of the pipeline config with one stage section's fields changed."""
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=overrides)})


def planned_args(cfg, stage: str) -> dict:
    """The plain run arguments the planner gives a stage (paths such as `pool_path`)."""
    from tracecore.flows.plan import plan_pipeline
    from tracecore.storage.store import ArtifactStore

    return plan_pipeline(cfg, ArtifactStore(cfg.store), [stage])[stage].args


def stage_plan(cfg, stage: str):
    """The planner's StagePlan of one stage (its upstream stages planned too, not run)."""
    from tracecore.flows.plan import plan_pipeline
    from tracecore.storage.store import ArtifactStore

    return plan_pipeline(cfg, ArtifactStore(cfg.store), [stage])[stage]


def run_planned(cfg, stage: str, plan=None, store_uri: str | None = None) -> dict[str, str]:
    """Run one stage through the runner (no upstream, no Prefect); returns its refs by output name."""
    from tracecore.tasks.runtime.registry import stages_of
    from tracecore.tasks.runtime.stage import run_stage

    plan = plan or stage_plan(cfg, stage)
    return run_stage(stages_of(cfg)[stage], getattr(cfg, stage), plan, store_uri or cfg.store)


@pytest.fixture(scope="session")
def pipeline_run(prefect_harness, tmp_path_factory):
    """One full pipeline run of the test profile (run id `run-a`), shared by the tests that inspect it."""
    from types import SimpleNamespace

    from tracecore.flows.pipeline import pipeline
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.runtime.registry import load_config

    # stages overlap (in-process Dask would otherwise run them one at a time: see `parallel_stages`)
    cfg = load_config(str(TEST_PROFILE), ["parallel_stages=4"],
                      store=str(tmp_path_factory.mktemp("pipeline") / "store"))
    result = pipeline(config=cfg.model_dump(mode="json"), run_id="run-a")
    store = ArtifactStore(cfg.store)
    record = json.loads(store.fs.open(f"{store.run_dir('run-a')}/run.json").read())
    return SimpleNamespace(cfg=cfg, store=store, record=record, result=result)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """The packaged SmolLM2 imported once per session (converting its GGUF takes ~20 s); skips where
    `make setup` has not fetched it."""
    from tracecore.tasks.gguf_models import PACKAGED, import_gguf, models_dir

    if not (models_dir() / PACKAGED["smollm2-135m-instruct"][1]).is_file():
        pytest.skip("packaged SmolLM2 not installed (make setup fetches it)")
    from tracecore.storage.store import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("smollm2") / "store")
    ref = import_gguf(store, "smollm2-135m-instruct", "test")
    with store.local_dir(ref) as folder:
        yield folder, store.manifest(ref)
