"""gradients + select (TAGCOS): exact batched per-sample gradients, feature properties, OMP guarantees."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import planned_args, with_section
from tracecore.flows.pipeline import run_stages
from tracecore.kernels.per_sample import batched_grads, loop_grads
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.features import read_features
from tracecore.tasks.gradients import lora_model
from tracecore.tasks.instructions import collate, encode, load_pool
from tracecore.tasks.models import model_dir
from tracecore.tasks.select import omp, omp_fill


def features(cfg, refs, store_uri, **overrides):
    """The gradients stage with changed settings; returns the store, every ref and the pool path."""
    cfg = with_section(cfg, "gradients", **overrides)
    return ArtifactStore(store_uri), run_stages(cfg,
                                                ["gradients"]), planned_args(cfg, "gradients")["pool_path"]


def select_refs(cfg) -> dict[str, str]:
    """The select stage's refs by output name."""
    return {k.split(".", 1)[1]: v for k, v in run_stages(cfg, ["select"]).items() if k.startswith("select.")}


def test_batched_per_sample_gradients_equal_the_loop(pretrained):
    cfg, refs = pretrained
    store = ArtifactStore(cfg.store)
    with model_dir(store, refs["pretrain.model"]) as folder:
        tok, model = lora_model(folder, cfg.gradients)
    model.eval()
    with torch.no_grad():  # LoRA B starts at zero; make both factors non-trivial
        for p in (p for p in model.parameters() if p.requires_grad):
            p.normal_(0, 0.05)
    pool = planned_args(cfg, "gradients")["pool_path"]
    records, _ = load_pool(pool)
    batch = collate([encode(tok, r, 64) for r in records[:12]], tok.pad_token_id)  # varied lengths: padding
    batched, looped = batched_grads(model, batch), loop_grads(model, batch)
    assert batched.shape == looped.shape and batched.shape[0] == 12
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-6)


def test_features_unit_norm_deterministic_and_shard_independent(pretrained, tmp_path):
    cfg, refs = pretrained
    store, grefs, _ = features(cfg, refs, cfg.store, shards=1)
    ids, mean = read_features(store, grefs["gradients.features"])
    for step in cfg.gradients.checkpoint_steps:
        _, per_ckpt = read_features(store, grefs["gradients.features"], f"ckpt_{step}")
        np.testing.assert_allclose(np.linalg.norm(per_ckpt, axis=1), 1.0, atol=2e-3)  # fp16 on disk
    assert mean.shape == (len(ids), cfg.gradients.proj_dim) and np.isfinite(mean).all()
    other, grefs4, _ = features(cfg, refs, cfg.store, shards=4)
    ids4, mean4 = read_features(other, grefs4["gradients.features"])
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


@pytest.mark.parametrize("seed", [4499, 13397])
def test_omp_weights_stay_nonnegative_when_a_refit_after_a_drop_turns_another_negative(seed):
    """Dropping the negative coefficients and refitting once can leave a new negative one (these random
    systems do, at a small ridge lambda): the drop-and-refit repeats until every weight is >= 0."""
    rng = np.random.default_rng(seed)
    n, d = rng.integers(4, 12), rng.integers(2, 6)
    A, b = rng.normal(size=(d, n)), rng.normal(size=d)
    picks = omp_fill(A, b, max(1, n // 2), 0.001, 1e-4)
    assert len(picks) == max(1, n // 2) and min(w for _, w in picks) >= 0, picks


def test_select_budgets_residuals_and_baselines(pretrained):
    cfg, refs = pretrained
    store, _, pool = features(cfg, refs, cfg.store, shards=2)
    srefs = select_refs(with_section(cfg, "gradients", shards=2))
    clusters = store.read_table(srefs["clusters"]).to_pylist()
    coreset = store.read_table(srefs["coreset"]).to_pylist()
    for c in clusters:
        assert c["budget"] == int(cfg.select.rate * c["size"])
        assert sum(r["cluster"] == c["cluster"] for r in coreset) == c["budget"]
    assert min(r["omp_weight"] for r in coreset) >= 0
    assert sum(c["residual_tagcos"] for c in clusters) < sum(c["residual_cluster_random"] for c in clusters)
    random = store.read_table(srefs["random"]).to_pylist()
    cluster_random = [r for r in store.read_table(srefs["cluster_random"]).to_pylist() if r["draw"] == 0]
    assert sum(r["draw"] == 0 for r in random) == len(coreset) == len(cluster_random)
    for c in clusters:
        assert sum(r["cluster"] == c["cluster"] for r in cluster_random) == c["budget"]
    assert "rates" in store.manifest(srefs["coreset"])
    families = store.read_table(srefs["families"]).to_pylist()  # which families each selection covers
    from tracecore.tasks.instructions import load_pool

    records = load_pool(pool)[0]
    assert {f["family"] for f in families} == {r["family"] for r in records}
    for column in ("pool", "tagcos", "cluster_random", "random"):
        assert abs(sum(f[column] for f in families) - 1) < 1e-9
    tagcos_families = [r["family"] for r in records if r["id"] in {c["record_id"] for c in coreset}]
    assert {f["family"]: f["tagcos_records"] for f in families} == {f: tagcos_families.count(f) for f in
                                                                   {f["family"] for f in families}}


def test_adam_direction_is_the_papers_formula_by_hand():
    """LESS/TAGCOS: m' = 0.9 m + 0.1 g, v' = 0.999 v + 0.001 g^2, direction m' / (sqrt(v') + 1e-8), no bias
    correction. A tiny v makes eps-inside-the-sqrt (the official code's variant) read differently."""
    from tracecore.tasks.gradients import adam_direction

    g = torch.tensor([1e-4, -2.0, 0.5], dtype=torch.float64)
    m = torch.tensor([0.0, 0.1, -0.3], dtype=torch.float64)
    v = torch.tensor([0.0, 0.04, 1e-6], dtype=torch.float64)
    expected = []
    for gi, mi, vi in zip(g.tolist(), m.tolist(), v.tolist()):
        m2, v2 = 0.9 * mi + 0.1 * gi, 0.999 * vi + 0.001 * gi * gi
        expected.append(m2 / (v2 ** 0.5 + 1e-8))
    torch.testing.assert_close(adam_direction(g, m, v), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_warmup_checkpoints_sit_in_the_rising_warmup_and_record_the_lr_they_trained_with(pretrained,
                                                                                          monkeypatch):
    """TAGCOS's checkpoints (10/20/30 steps) lie inside the linear warm-up: the lr rises, the last checkpoint
    weighs most, and step 1 trains at a positive lr. Each checkpoint records the lr its own step used."""
    from tracecore.tasks.gradients import checkpoint_weights, lora_params, warmup

    cfg, refs = pretrained
    store = ArtifactStore(cfg.store)
    gcfg = cfg.gradients.model_copy(update={"checkpoint_steps": [2, 4, 6]})
    with model_dir(store, refs["pretrain.model"]) as folder:
        tok, model = lora_model(folder, gcfg)
    records, _ = load_pool(planned_args(cfg, "gradients")["pool_path"])
    used = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    ckpts = warmup(model, tok, records[:40], gcfg, logging_stub())
    assert len(used) == 6 and used[0] > 0, used
    assert all(b > a for a, b in itertools.pairwise(used)), used  # inside warm-up: rising
    assert [c["lr"] for c in ckpts] == [used[1], used[3], used[5]]
    weights = checkpoint_weights([c["lr"] for c in ckpts])
    np.testing.assert_allclose(weights, [1 / 6, 2 / 6, 3 / 6], rtol=1e-6)  # linear warm-up through the origin
    assert len(lora_params(model)) > 0


def logging_stub():
    import logging

    return logging.getLogger("test")


def test_random_baselines_are_drawn_per_seed(pretrained):
    """`random` and `cluster_random` hold one draw per seed, so intervals over seeds include selection noise;
    fine-tuning seed s trains on draw s mod draws."""
    from tracecore.tasks.finetune import subset_records

    cfg, refs = pretrained
    store, _, pool_path = features(cfg, refs, cfg.store, shards=2)
    srefs = select_refs(with_section(with_section(cfg, "gradients", shards=2), "select", baseline_draws=3))
    pool, _ = load_pool(pool_path)
    size = store.read_table(srefs["coreset"]).num_rows
    for name in ("random", "cluster_random"):
        picks = [{r["id"] for r in subset_records(store, pool, srefs[name], seed)} for seed in range(4)]
        assert all(len(p) == size for p in picks)
        assert len({frozenset(p) for p in picks[:3]}) == 3, name  # three different draws
        assert picks[3] == picks[0]  # seed 3 reuses draw 0


def test_cached_projector_equals_the_one_off_projection_and_bounds_its_cache():
    """Caching R's blocks must not change a feature (same seeds per block), and past the byte budget the
    blocks are regenerated instead of kept (a 7B model's LoRA width x 8192 would not fit)."""
    import torch
    from tracecore.tasks.gradients import Projector, project

    x = torch.randn(5, 10_000, generator=torch.Generator().manual_seed(0))
    cached = Projector(64, 3, block=4096)
    torch.testing.assert_close(cached(x), project(x, 64, 3))
    torch.testing.assert_close(cached(x), project(x, 64, 3))  # second call from the cache
    assert len(cached.blocks) == 3
    tight = Projector(64, 3, block=4096, cache_bytes=4096 * 64 * 4)
    torch.testing.assert_close(tight(x), project(x, 64, 3))
    assert len(tight.blocks) == 1


def test_family_coverage_rows_do_not_depend_on_the_hash_seed():
    """Equal-sized families once came out in set order, which differs between processes (PYTHONHASHSEED):
    a resumed run then wrote a different table than an uninterrupted one."""
    import json
    import subprocess
    import sys

    code = ("import json; from tasks.select import family_coverage; "
            "pool = [{'id': str(i), 'family': f} for i, f in enumerate(['b', 'a', 'c', 'd'] * 3)]; "
            "print(json.dumps(family_coverage(pool, {'pool': [r['id'] for r in pool], 'tagcos': ['0', '1'], "
            "'cluster_random': ['2'], 'random': ['3']})))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout
               for seed in range(6)}
    assert len(outputs) == 1
    assert [r["family"] for r in json.loads(outputs.pop())] == ["a", "b", "c", "d"]


def test_flag_rates_carry_wilson_intervals_and_a_test_against_the_pool_rate():
    """3 low-quality rows of 96 against a pool rate of 5.1 % (4.9 expected) is p ~ 0.27: a lower rate alone
    is not evidence that TAGCOS selects against noise, so the table carries the interval and the p-value."""
    from scipy.stats import binomtest
    from tracecore.tasks.select import selection_rates

    pool = [{"id": f"r{i}", "quality": "low" if i < 51 else "ok"} for i in range(1000)]
    chosen = [f"r{i}" for i in range(3)] + [f"r{i}" for i in range(100, 193)]
    rates = selection_rates(pool, {"pool": [r["id"] for r in pool], "tagcos": chosen})
    low = rates["tagcos"]
    assert low["low_quality_rate"] == 3 / 96 and low["low_quality_n"] == 96
    assert 0 <= low["low_quality_lo"] < 3 / 96 < low["low_quality_hi"] <= 1
    assert abs(low["low_quality_p_below_pool"] - binomtest(3, 96, 0.051, alternative="less").pvalue) < 1e-12
    assert low["low_quality_p_below_pool"] > 0.05
    assert "low_quality_p_below_pool" not in rates["pool"]
