"""SIGKILL at every stage boundary and in the middle of every sharded stage of the whole pipeline.

The kills run one after another on one store, so each case's re-run is the previous kill's resume
(`tracecore run --resume RUN_ID`): cost ~ one pipeline plus a process start per kill point, instead of a
pipeline per point. Each case checks the kill landed where it should (the stage committed, or some of its
shards kept and the stage not committed); the last case resumes to the end and compares every artifact
with an uninterrupted run of the same config: the same artifacts, the same rows, equal checksums (tables
with measured columns — wall clock, peak memory — are compared without them), and mid-stage kills' shards
reused. Run the cases in order (the default); a single case also works, it just starts from an emptier store.
"""

from __future__ import annotations

import json

import pytest
from conftest import TEST_PROFILE, run_cli
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.registry import STAGES

pytestmark = pytest.mark.slow
# Sharded stages -> the label of their first shard loop (`StageRun.step`: the stage for its primary output,
# else `<stage>-<output>`), as the fault hook sees it.
MID_STAGE = {"ingest": "ingest-parsed", "tokenize": "tokenize", "ngram": "ngram-index",
             "memorization": "memorization-pairs", "gradients": "gradients", "select": "select-selection",
             "preference": "preference-parsed", "finetune": "finetune", "eval": "eval-quality"}
POINTS = [p for stage in STAGES for p in ([f"{MID_STAGE[stage]}:1"] if stage in MID_STAGE else [])
          + [f"after-{stage}:1"]]
STAGE_OF = {f"{loop}:1": stage for stage, loop in MID_STAGE.items()} | {f"after-{s}:1": s for s in STAGES}
# One stage at a time: the chain walks every stage boundary in order, which concurrent branches would reorder
# (a failure during concurrent stages, and its resume, is test_rel_failure_resume's ngram-beside-pretrain
# case).
CONFIG = ["--profile", str(TEST_PROFILE), "--set", "dask.processes=true", "--set", "parallel_stages=1"]
# Measured columns (wall clock, allocator peaks): two uninterrupted runs differ there and nowhere else
# (measured: only the fine-tune curves and summary have them; weights, features, tables are byte-equal).
# `resumed_from_step` is run history: a variant that was mid-training at a kill says where it resumed.
MEASURED_COLUMNS = {"seconds", "tokens_per_second", "peak_memory_mb", "resumed_from_step"}


def status(store: str) -> dict:
    """What `tracecore status --json` prints, computed in this process (the CLI's own `status_rows`; a CLI
    process per kill cost ~3 s each; the command itself is tested in test_pipeline)."""
    from tracecore.flows.cli import status_rows

    record, rows = status_rows(store, None)
    return {"run_id": record["run_id"], "state": record["state"], "rows": rows}


@pytest.fixture(scope="module")
def server(prefect_harness) -> dict:
    """Every run reports to one test server (as to the UI), which also saves a server start per run."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, server) -> str:
    store = str(tmp_path_factory.mktemp("uninterrupted") / "store")
    proc = run_cli("run", *CONFIG, "--store", store, env=server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store


@pytest.fixture(scope="module")
def chain(tmp_path_factory, server) -> dict:
    """The shared store; `run_id` is set by the first kill and resumed by every later case."""
    return {"store": str(tmp_path_factory.mktemp("killed") / "store"), "run_id": None, "killed_mid": [],
            "kept": {}, "env": server}


def run_until(chain: dict, fault: str | None):
    args = ["--resume", chain["run_id"]] if chain["run_id"] else CONFIG
    env = {**chain["env"], **({"TRACECORE_KILL_AT": fault} if fault else {})}
    return run_cli("run", *args, "--store", chain["store"], env=env)


@pytest.mark.parametrize("fault", POINTS)
def test_sigkill_lands_and_keeps_finished_work(chain, fault):
    proc = run_until(chain, fault)
    assert proc.returncode == -9, (f"expected SIGKILL at {fault}: exit {proc.returncode}\n"
                                   f"{proc.stderr[-3000:]}")
    state = status(chain["store"])
    chain["run_id"] = state["run_id"]
    stage = STAGE_OF[fault]
    rows = [r for r in state["rows"] if r["stage"] == stage]
    assert rows, f"the run record has no row for stage {stage}"
    if fault.startswith("after-"):
        assert all(r["committed"] for r in rows), rows
        assert all(r["committed"] for r in state["rows"] if STAGES.index(r["stage"]) < STAGES.index(stage))
    else:  # mid-stage: at least one shard of one of its artifacts is kept, the stage is not finished
        assert not all(r["committed"] for r in rows), rows
        assert any(r["shards_done"] >= 1 and r["on_rerun"].startswith("resume") for r in rows), rows
        chain["killed_mid"].append(stage)
        chain["kept"].update({r["artifact"]: r["shards_done"] for r in rows if r["shards_done"]
                              and not r["committed"]})


def comparable(store: ArtifactStore, ref: str):
    """An artifact's content minus measured columns: (rows per shard, table) or its checksum."""
    manifest = store.manifest(ref)
    # an intermediate whose shards were deleted: what it held, not its bytes (paths)
    if manifest.get("cleaned"):
        return ("cleaned", manifest["rows"], manifest["shards"])
    table = store.read_table(ref) if store.markers(ref) else None
    if table is None:
        return manifest["checksum"]
    # `file`: a path in each store
    keep = [c for c in table.column_names if c not in MEASURED_COLUMNS and c != "file"]
    # nested `file` fields too (trace's document lists); JSON text, so NaN equals NaN
    return json.dumps([without_files(row) for row in table.select(keep).to_pylist()], sort_keys=True,
                      default=str)


def without_files(value):
    """A row with every `file` field dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_files(v) for k, v in value.items() if k != "file"}
    if isinstance(value, list):
        return [without_files(v) for v in value]
    return value


def test_resume_after_every_kill_matches_uninterrupted(chain, uninterrupted):
    proc = run_until(chain, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed, clean = status(chain["store"]), status(uninterrupted)
    assert killed["state"] == "completed"
    rows_of = {r["artifact"]: (r["committed"], r["rows"]) for r in killed["rows"]}
    # no lost/duplicated rows
    assert rows_of == {r["artifact"]: (r["committed"], r["rows"]) for r in clean["rows"]}
    ours, theirs = ArtifactStore(chain["store"]), ArtifactStore(uninterrupted)
    mismatched = []
    for ref, (committed, _) in rows_of.items():
        if committed and ours.manifest(ref)["checksum"] != theirs.manifest(ref)["checksum"]:
            a, b = comparable(ours, ref), comparable(theirs, ref)
            if not (a.equals(b) if hasattr(a, "equals") else a == b):
                mismatched.append(ref)
    assert not mismatched, f"artifacts differing from the uninterrupted run: {mismatched}"
    # the shards finished before a mid-stage kill were reused, not recomputed
    for stage in chain["killed_mid"]:
        skipped = [ours.manifest(r["artifact"]).get("skipped_shards") for r in killed["rows"]
                   if r["stage"] == stage]
        assert any(n for n in skipped
                   if n), f"{stage}: no shard kept across the kill (skipped_shards {skipped})"
    # exactly, where the artifact records it (the primary output of a shard loop: features, tokens, the index,
    # fine-tune variants...): every shard a kill left behind was skipped on resume, and only those recomputed
    skipped = {ref: n for ref in chain["kept"] if (n := ours.manifest(ref).get("skipped_shards")) is not None}
    assert skipped == {ref: chain["kept"][ref] for ref in skipped}, (chain["kept"], skipped)
    # the feature-extraction kill, exactly
    assert any(ref.startswith("features/") for ref in skipped), skipped
