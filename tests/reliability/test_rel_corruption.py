"""Corrupted artifact shards are detected by checksum, reported with their path, and recomputed."""

from __future__ import annotations

import logging

import pytest
from tracecore.flows.pipeline import execute_stage
from tracecore.storage.store import ArtifactStore, CorruptShardError


@pytest.fixture
def tokenized(test_config):
    cfg = test_config()
    config, refs = cfg.model_dump(mode="json"), {}
    for stage in ("sample", "ingest", "tokenize"):
        refs.update(execute_stage(stage, config))
    return ArtifactStore(cfg.store), config, refs


def corrupt(store: ArtifactStore, ref: str) -> list[str]:
    """Truncate shard 0 and flip one byte in the middle of shard 1; returns their paths."""
    truncated, flipped = store.shard_path(ref, 0), store.shard_path(ref, 1)
    data = store.fs.cat(truncated)
    store.fs.pipe(truncated, data[: len(data) // 2])
    data = bytearray(store.fs.cat(flipped))
    data[len(data) // 2] ^= 0xFF
    store.fs.pipe(flipped, bytes(data))
    return [truncated, flipped]


def test_corrupt_shards_are_never_read_silently(tokenized):
    store, _, refs = tokenized
    bad = corrupt(store, refs["tokenize.tokens"])
    for shard, path in enumerate(bad):
        with pytest.raises(CorruptShardError, match=path):
            store.read_shard(refs["tokenize.tokens"], shard)
    assert sorted(store.corrupt_parts(refs["tokenize.tokens"])) == sorted(bad)


def test_rerun_recomputes_exactly_the_corrupt_shards(tokenized, caplog):
    store, config, refs = tokenized
    ref = refs["tokenize.tokens"]
    before = store.manifest(ref)
    untouched = {m["shard"]: m for m in store.markers(ref) if m["shard"] not in (0, 1)}
    bad = corrupt(store, ref)
    with caplog.at_level(logging.WARNING):
        execute_stage("tokenize", config)
    assert any(bad[0] in r.getMessage() for r in caplog.records)  # the log names the corrupt file
    after = store.manifest(ref)
    assert after["checksum"] == before["checksum"] and after["rows"] == before["rows"]
    assert not store.corrupt_parts(ref)
    for shard, marker in untouched.items():  # intact shards were not rewritten
        assert store.markers(ref)[shard]["write_seconds"] == marker["write_seconds"]


def test_corrupt_model_weights_recompute_the_stage(tokenized):
    store, config, refs = tokenized
    refs.update(execute_stage("pretrain", config))
    ref = refs["pretrain.model"]
    weights = f"{store.files_dir(ref)}/model.safetensors"
    data = bytearray(store.fs.cat(weights))
    data[-10] ^= 0x01
    store.fs.pipe(weights, bytes(data))
    assert store.corrupt_parts(ref) == [weights]
    execute_stage("pretrain", config)
    assert store.is_committed(ref) and not store.corrupt_parts(ref)
