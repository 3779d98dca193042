"""Stage `finetune`: held-out loss improves on every subset, resume reproduces the uninterrupted run,
variants are reused across configurations, ChatQA 2 context extension changes the RoPE base."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import planned_args
from tracecore.flows.pipeline import execute_stage
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.finetune_training import Resume, load_model, step_batches, train
from tracecore.tasks.instructions import encode, load_pool
from tracecore.tasks.models import model_dir


@pytest.fixture(scope="module")
def finetuned(pretrained):
    cfg, refs = pretrained
    refs = dict(refs)
    config = cfg.model_dump(mode="json")
    for stage in ("gradients", "select", "finetune"):
        refs.update(execute_stage(stage, config))
    return cfg, refs


def test_every_subset_lowers_held_out_loss_and_saves_a_loadable_model(finetuned):
    from transformers import AutoModelForCausalLM

    cfg, refs = finetuned
    store = ArtifactStore(cfg.store)
    rows = {r["variant"]: r for r in store.read_table(refs["finetune.finetune"]).to_pylist()}
    assert set(rows) == {"tagcos_s0", "random_s0", "full_s0"}
    coreset = store.read_table(refs["select.coreset"]).num_rows
    assert rows["tagcos_s0"]["records"] == rows["random_s0"]["records"] == coreset
    assert rows["full_s0"]["records"] == len(load_pool(planned_args(cfg, "finetune")["pool_path"])[0])
    for r in rows.values():
        assert r["eval_loss"] < r["eval_loss_base"], r
        assert r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0
    with store.local_dir(rows["tagcos_s0"]["model_ref"]) as folder:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        assert not any(k.endswith(".bin") for k in __import__("os").listdir(folder))
    assert model.config.vocab_size > 0
    curve = store.read_table(rows["tagcos_s0"]["model_ref"]).to_pylist()
    assert len(curve) == rows["tagcos_s0"]["steps"] and curve[-1]["loss"] < curve[0]["loss"]
    assert "plots/finetune_loss.png" in store.manifest(refs["finetune.finetune"])["plots"]


def test_new_seed_trains_only_the_new_variants(finetuned):
    cfg, refs = finetuned
    config = cfg.model_dump(mode="json")
    config["finetune"] = {**config["finetune"], "seeds": [0, 1], "subsets": ["tagcos", "random"]}
    store = ArtifactStore(cfg.store)
    before = {r["variant"]: r["model_ref"] for r in store.read_table(refs["finetune.finetune"]).to_pylist()}
    mtimes = {v: store.fs.info(store.manifest_path(ref))["mtime"] for v, ref in before.items()}
    new = execute_stage("finetune", config)
    rows = {r["variant"]: r["model_ref"] for r in store.read_table(new["finetune.finetune"]).to_pylist()}
    assert set(rows) == {"tagcos_s0", "random_s0", "tagcos_s1", "random_s1"}
    for v in ("tagcos_s0", "random_s0"):
        assert rows[v] == before[v] and store.fs.info(store.manifest_path(rows[v]))["mtime"] == mtimes[v]


class Crash(RuntimeError):
    pass


def small_run(cfg, refs, tmp_path, crash_after_first_checkpoint: bool):
    """10 optimizer steps on 40 records, checkpoint every 4; optionally crash right after step 4's save."""
    store = ArtifactStore(str(tmp_path / "resume-store"))
    fcfg = cfg.finetune.model_copy(update={"epochs": 2, "batch_size": 4, "grad_accum": 1,
                                           "checkpoint_every": 4, "max_steps": 10, "device": "cpu"})
    src = ArtifactStore(cfg.store)
    with model_dir(src, refs["pretrain.model"]) as folder:
        tok, model = load_model(folder, fcfg, "cpu", torch.float32)
    records = load_pool(planned_args(cfg, "finetune")["pool_path"])[0][:40]
    data = [encode(tok, r, 64) for r in records]
    resume = Resume(store, "finetuned/test")
    if crash_after_first_checkpoint:
        original = resume.save

        def save_then_crash(*args):
            original(*args)
            raise Crash

        resume.save = save_then_crash
        with pytest.raises(Crash):
            train(model, data, tok.pad_token_id, fcfg, 0, "cpu", resume, _Log())
        # a fresh process: fresh model, state from the store
        with model_dir(src, refs["pretrain.model"]) as folder:
            tok, model = load_model(folder, fcfg, "cpu", torch.float32)
        resume = Resume(store, "finetuned/test")
    curve = train(model, data, tok.pad_token_id, fcfg, 0, "cpu", resume, _Log())
    return model, curve, resume


class _Log:
    def info(self, *args):
        pass


def test_resumed_fine_tune_reaches_the_same_weights(pretrained, tmp_path):
    cfg, refs = pretrained
    straight, curve_a, _ = small_run(cfg, refs, tmp_path / "a", crash_after_first_checkpoint=False)
    resumed, curve_b, resume = small_run(cfg, refs, tmp_path / "b", crash_after_first_checkpoint=True)
    assert resume.started_at == 4 and len(curve_b) == len(curve_a) == 10
    assert [round(c["loss"], 5) for c in curve_b] == [round(c["loss"], 5) for c in curve_a]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    state = json.loads(resume.store.read_file("finetuned/test", "resume/state.json"))
    assert state["step"] == 8  # the resumed run saved its own later checkpoint


def test_step_plan_covers_every_record_once_per_epoch(pretrained):
    cfg, _ = pretrained
    fcfg = cfg.finetune.model_copy(update={"epochs": 3, "batch_size": 4, "grad_accum": 3, "max_steps": None})
    plan = step_batches(50, fcfg, seed=7)
    per_epoch = -(-50 // 12)
    assert len(plan) == 3 * per_epoch
    for e in range(3):
        ids = [i for step in plan[e * per_epoch:(e + 1) * per_epoch] for micro in step for i in micro]
        assert sorted(ids) == list(range(50))
    assert plan == step_batches(50, fcfg, seed=7) and plan != step_batches(50, fcfg, seed=8)


def test_long_context_extension_raises_rope_base(pretrained, tmp_path):
    from transformers import AutoConfig

    cfg, refs = pretrained
    config = cfg.model_dump(mode="json")
    config["finetune"] = {**config["finetune"], "subsets": ["full"], "max_steps": 2,
                          "long_context": {"enabled": True, "rope_theta": 1e6, "seq_len": 256, "steps": 3}}
    config["stages"] = ["finetune"]
    new = dict(refs)
    for stage in ("gradients", "select", "finetune"):
        new.update(execute_stage(stage, config))
    store = ArtifactStore(cfg.store)
    manifest = store.manifest(new["finetune.long_model"])
    assert manifest["rope_theta"] == 1e6 and manifest["seq_len"] == 256
    with store.local_dir(new["finetune.long_model"]) as folder:
        long_cfg = AutoConfig.from_pretrained(folder)
    theta = (getattr(long_cfg, "rope_parameters", None) or {}).get("rope_theta",
                                                                   getattr(long_cfg, "rope_theta", None))
    assert theta == 1e6 and long_cfg.max_position_embeddings >= 256
    row = store.read_table(new["finetune.finetune"]).to_pylist()[0]
    assert store.manifest(row["model_ref"])["inputs"]["model"] == new["finetune.long_model"]
    # ChatQA 2's point is the context-extended model: eval's long-context part must evaluate it, not the base
    from tracecore.tasks.eval import long_context_model

    assert long_context_model(store, refs["pretrain.model"], new["finetune.finetune"], 128) == \
        (new["finetune.long_model"], 256)


def test_eval_split_defaults_to_sample_world(pretrained):
    cfg, _ = pretrained
    assert planned_args(cfg, "finetune")["eval_path"].endswith("instructions/eval.jsonl")


def test_full_pool_reference_trains_on_the_first_full_seeds_only():
    from tracecore.configs.schema import FinetuneConfig
    from tracecore.tasks.finetune import training_hash, variants

    cfg = FinetuneConfig(subsets=["tagcos", "full"], seeds=[0, 1, 2], full_seeds=1)
    assert variants(cfg) == [("tagcos", 0), ("tagcos", 1), ("tagcos", 2), ("full", 0)]
    assert variants(cfg.model_copy(update={"full_seeds": None}))[-1] == ("full", 2)
    # variants are reused
    assert training_hash(cfg) == training_hash(cfg.model_copy(update={"full_seeds": None}))
