"""The runner owns a stage's bookkeeping: shard mapping, single-table outputs, report previews, integrity
answers, one validation of the config. Each test here failed on the code before the runner took these over."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest
import tracecore.storage.store as store_module
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.common import map_shards
from tracecore.tasks.runtime.stage import Planned, StagePlan, StageRun


def write_square(store_uri: str, ref: str, shard: int, item: int) -> dict:
    """A worker: one shard of one row; returns its marker, as every stage's worker does."""
    return ArtifactStore(store_uri).write_shard(ref, shard, pa.table({"x": [item * item]}))


def count_marker_reads(monkeypatch) -> list[str]:
    reads, real = [], store_module.read_json
    monkeypatch.setattr(store_module, "read_json",
                        lambda fs, path: (reads.append(path) if "/_markers/" in path else None)
                            or real(fs, path))
    return reads


def test_markers_the_workers_return_are_used_not_read_back(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    reads = count_marker_reads(monkeypatch)
    report = map_shards("squares", store, "squares/fp", write_square, [1, 2, 3], None)
    assert reads == [] and [m["shard"] for m in report.markers] == [0, 1, 2] and report.computed == 3
    again = map_shards("squares", store, "squares/fp", write_square, [1, 2, 3], None)
    assert again.skipped == 3 and len(reads) == 3  # a re-run reads each kept marker once, and no shard data


def test_a_shard_rewritten_in_place_is_recomputed_without_hashing_the_intact_ones(tmp_path, monkeypatch):
    """rsync's rule: same size and stamp = intact (no byte read); a rewrite changes the stamp, and only then
    are its bytes hashed."""
    store = ArtifactStore(tmp_path)
    map_shards("squares", store, "squares/fp", write_square, [1, 2, 3], None)
    path = store.shard_path("squares/fp", 1)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    time.sleep(0.01)
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    hashed, real = [], store_module.file_checksum
    monkeypatch.setattr(store_module, "file_checksum", lambda fs, p, *a: hashed.append(p) or real(fs, p, *a))
    report = map_shards("squares", store, "squares/fp", write_square, [1, 2, 3], None)
    assert report.computed_shards == [1] and hashed == [path]
    assert store.read_shard("squares/fp", 1)["x"].to_pylist() == [4]


def test_a_copied_store_is_checked_by_content_not_by_stamp(tmp_path):
    """Copying a store (new modification times) must not make every artifact look corrupt."""
    store = ArtifactStore(tmp_path)
    map_shards("squares", store, "squares/fp", write_square, [1, 2], None)
    store.commit("squares/fp", {})
    for shard in (0, 1):
        path = store.shard_path("squares/fp", shard)
        os.utime(path, (1, 1))
    assert store.status("squares/fp").reusable


def stage_run(tmp_path, outputs: dict[str, str]) -> StageRun:
    plan = StagePlan("demo",
                     {name: Planned(f"{folder}/fp", {"stage": "demo"}) for name, folder in outputs.items()},
                     {})
    return StageRun(ArtifactStore(tmp_path), None, plan)


def test_a_stage_maps_and_writes_through_its_plan(tmp_path):
    run = stage_run(tmp_path, {"summary": "demo_summary", "scores": "demo_scores"})
    report = run.map("scores", write_square, [3, 4])
    assert run.step("summary") == "demo" and run.step("scores") == "demo-scores" and report.computed == 2
    manifest = run.write("summary", pa.table({"name": ["a", "b"], "value": [1.5, 2.0]}),
                         {"report_columns": ["name", "value"]})
    assert manifest["shards"] == 1 and run.store.is_committed("demo_summary/fp")
    # the report's table travels in the manifest, so a report reads no artifact data
    assert manifest["report_rows"] == [{"name": "a", "value": 1.5}, {"name": "b", "value": 2.0}]


def test_the_config_is_validated_once_per_mapping(monkeypatch):
    from tracecore.tasks.runtime import registry

    data = registry.load_config("tiny").model_dump(mode="json")
    data["store"] = "/tmp/validated-once"  # a mapping no other test validated
    model_class = registry.pipeline_model(())
    calls, real = [], model_class.model_validate.__func__
    monkeypatch.setattr(model_class, "model_validate",
                        classmethod(lambda cls, d, **k: calls.append(1) or real(cls, d, **k)))
    first, second = registry.validate_config(data), registry.validate_config(dict(data))
    assert len(calls) == 1 and first == second
    first.store = "/elsewhere"  # each caller owns its copy
    assert registry.validate_config(data).store == "/tmp/validated-once"


@pytest.mark.parametrize("field", ["parallel_stages"])
def test_a_bad_config_still_names_its_field(field):
    from tracecore.configs.schema import ConfigError
    from tracecore.tasks.runtime import registry

    data = registry.load_config("tiny").model_dump(mode="json")
    data[field] = "not a number"
    with pytest.raises(ConfigError, match=field):
        registry.validate_config(data)


def test_bit_rot_under_an_unchanged_stamp_is_found_only_by_hashing(tmp_path):
    """The trade the quick check makes, stated as a test: a byte flipped with size and modification time kept
    (media corruption, not a rewrite) passes `status`, and `status(checksums=True)` (`tracecore status
    --checksums`) finds it; reading the shard always verifies its checksum."""
    store = ArtifactStore(tmp_path)
    map_shards("squares", store, "squares/fp", write_square, [1, 2], None)
    store.commit("squares/fp", {})
    path = store.shard_path("squares/fp", 0)
    stat = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.status("squares/fp").reusable
    assert store.status("squares/fp", checksums=True).corrupt == (path,)
    with pytest.raises(store_module.CorruptShardError, match="part-00000"):
        store.read_shard("squares/fp", 0)


def test_the_report_shows_any_statistic_a_stage_records(tmp_path):
    """Statistics go through one API (`commit`/`write` stats) and the report renders them generically (failed
    on the old code: it picked nine names, so a stage's new statistic never showed)."""
    from tracecore.flows.report import artifact_rows

    run = stage_run(tmp_path, {"summary": "demo_summary"})
    run.write("summary", pa.table({"x": [1]}), {"widgets": 3, "ratio": 0.25, "plots": []})
    record = {"stages": {"demo": {"refs": {"summary": "demo_summary/fp"}, "status": "computed"}}}
    (row,) = artifact_rows(run.store, record)
    assert row["notes"] == "ratio=0.25, widgets=3" and row["on_rerun"] == "skip"


def test_the_report_rounds_float_noise_in_seconds_and_statistics(tmp_path):
    """A sum of pass times (0.1 + 0.2) shows as 0.3, not 0.30000000000000004 (failed on the old code)."""
    from tracecore.flows.report import artifact_rows

    run = stage_run(tmp_path, {"summary": "demo_summary"})
    run.write("summary", pa.table({"x": [1]}), {"seconds": 0.1 + 0.2, "ratio": 2 / 3, "lr": 5e-05, "n": 7})
    record = {"stages": {"demo": {"refs": {"summary": "demo_summary/fp"}, "status": "computed"}}}
    (row,) = artifact_rows(run.store, record)
    assert row["seconds"] == "0.3" and row["notes"] == "lr=5e-05, n=7, ratio=0.6667"
