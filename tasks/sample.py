"""The `sample` stage: writes the sample world (`tasks/world.py`) into the store as one artifact."""

from __future__ import annotations

from tracecore.configs.schema import SampleConfig
from tracecore.tasks.runtime.stage import Stage, StageRun
from tracecore.tasks.world import write_sample


def run_sample(run: StageRun) -> None:
    """Generate the sample world into the store (the `sample` artifact's files)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tracecore-sample-") as tmp:
        counts = write_sample(run.cfg, tmp)
        run.store.put_dir(run.ref("sample"), tmp)
    run.commit("sample", {"counts": counts})
    run.log.info("sample world written to %s: %s", run.store.display_path(run.ref("sample")), counts)


STAGE = Stage("sample", SampleConfig, {"sample": "sample"}, run_sample,
              description="the embedded sample world: corpus, facts, tasks, instructions, preferences")
