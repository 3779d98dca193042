"""gradients + select (TAGCOS): exact batched per-sample gradients, feature properties, OMP guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.plan import instruction_pool
from storage.store import ArtifactStore
from tasks.gradients import (
    batched_grads,
    collate,
    encode,
    load_pool,
    loop_grads,
    lora_model,
    plan_gradients,
    read_features,
    run_gradients,
)
from tasks.pretrain import model_dir
from tasks.select import omp, omp_fill, plan_select, run_select


def features(cfg, refs, store_uri, **overrides):
    gcfg = cfg.gradients.model_copy(update=overrides)
    pool, pool_id = instruction_pool(cfg, store_uri, refs)
    grefs = plan_gradients(gcfg, refs["model"], pool_id)
    run_gradients(store_uri, gcfg, refs["model"], pool, pool_id, grefs)
    return ArtifactStore(store_uri), grefs, pool


def test_batched_per_sample_gradients_equal_the_loop(pretrained):
    cfg, refs = pretrained
    store = ArtifactStore(cfg.store)
    with model_dir(store, refs["model"]) as folder:
        tok, model = lora_model(folder, cfg.gradients)
    model.eval()
    with torch.no_grad():  # LoRA B starts at zero; make both factors non-trivial
        for p in (p for p in model.parameters() if p.requires_grad):
            p.normal_(0, 0.05)
    pool, _ = instruction_pool(cfg, store.uri, refs)
    records, _ = load_pool(pool)
    batch = collate([encode(tok, r, 64) for r in records[:12]], tok.pad_token_id)  # varied lengths: padding
    batched, looped = batched_grads(model, batch), loop_grads(model, batch)
    assert batched.shape == looped.shape and batched.shape[0] == 12
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-6)


def test_features_unit_norm_deterministic_and_shard_independent(pretrained, tmp_path):
    cfg, refs = pretrained
    store, grefs, _ = features(cfg, refs, cfg.store, shards=1)
    ids, mean = read_features(store, grefs["features"])
    for step in cfg.gradients.checkpoint_steps:
        _, per_ckpt = read_features(store, grefs["features"], f"ckpt_{step}")
        np.testing.assert_allclose(np.linalg.norm(per_ckpt, axis=1), 1.0, atol=2e-3)  # fp16 on disk
    assert mean.shape == (len(ids), cfg.gradients.proj_dim) and np.isfinite(mean).all()
    other, grefs4, _ = features(cfg, refs, cfg.store, shards=4)
    ids4, mean4 = read_features(other, grefs4["features"])
    order = {i: k for k, i in enumerate(ids4)}
    np.testing.assert_allclose(mean, mean4[[order[i] for i in ids]], atol=2e-3)


def test_omp_is_nonnegative_and_respects_the_budget():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(32, 40))
    A /= np.linalg.norm(A, axis=0)
    b = A[:, :10].mean(1)
    cols, coefs = omp(A, b, 5, lam=1.0, tol=1e-4)
    assert 0 < len(cols) <= 5 and min(coefs) >= 0 and len(set(cols)) == len(cols)
    picks = omp_fill(A, b, 12, lam=1.0, tol=1e-4)
    assert len(picks) == 12 and len({c for c, _ in picks}) == 12 and min(w for _, w in picks) >= 0


def test_select_budgets_residuals_and_baselines(pretrained):
    cfg, refs = pretrained
    store, grefs, pool = features(cfg, refs, cfg.store, shards=2)
    srefs = plan_select(cfg.select, grefs["features"])
    run_select(store.uri, cfg.select, grefs["features"], pool, srefs)
    clusters = store.read_table(srefs["clusters"]).to_pylist()
    coreset = store.read_table(srefs["coreset"]).to_pylist()
    for c in clusters:
        assert c["budget"] == int(cfg.select.rate * c["size"])
        assert sum(r["cluster"] == c["cluster"] for r in coreset) == c["budget"]
    assert min(r["omp_weight"] for r in coreset) >= 0
    assert sum(c["residual_tagcos"] for c in clusters) < sum(c["residual_cluster_random"] for c in clusters)
    random = store.read_table(srefs["random"])
    cluster_random = store.read_table(srefs["cluster_random"]).to_pylist()
    assert random.num_rows == len(coreset) == len(cluster_random)
    for c in clusters:
        assert sum(r["cluster"] == c["cluster"] for r in cluster_random) == c["budget"]
    assert "rates" in store.manifest(srefs["coreset"])


@pytest.mark.slow
def test_killed_feature_extraction_recomputes_only_unfinished_shards(tmp_path):
    import json

    from conftest import TEST_PROFILE, run_cli

    args = ["run", "--profile", str(TEST_PROFILE), "--stages", "gradients", "--store", str(tmp_path / "s"),
            "--set", "gradients.shards=4", "--set", "dask.processes=true"]
    killed = run_cli(*args, env={"TRACECORE_KILL_AT": "gradients:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    status = json.loads(run_cli("status", "--store", str(tmp_path / "s"), "--json").stdout)
    row = next(r for r in status["rows"] if r["artifact"].startswith("features/"))
    assert not row["committed"] and 2 <= row["shards_done"] < 4
    resumed = run_cli("run", "--resume", status["run_id"], "--store", str(tmp_path / "s"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipping {row['shards_done']}/4 completed shards" in resumed.stdout + resumed.stderr
    assert ArtifactStore(tmp_path / "s").manifest(row["artifact"])["skipped_shards"] == row["shards_done"]
