"""preference: malformed inputs -> rejects, dataset guarantees, determinism and reuse."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from configs.schema import PreferenceConfig
from storage.store import ArtifactStore
from tasks.preference import (
    dedup_pairs,
    expand,
    load_library,
    parse_input,
    reversal_pairs,
    to_pair,
)

GOOD = {"prompt": "Tell me about tea.", "chosen": "Tea is a drink.", "rejected": "Tea is a drink made from leaves. "
        "It is grown in many countries. People drink it hot or cold."}
BAD = [  # (line content, reason fragment)
    ('{"prompt": "p", "chosen": "x"}', "missing field(s) ['rejected']"),
    ('{"chosen": "x", "rejected": "y"}', "missing field(s) ['prompt']"),
    ('{"prompt": "p", "chosen": "", "rejected": "y"}', "empty prompt or response"),
    ('{"prompt": "p", "chosen": "   ", "rejected": "y"}', "empty prompt or response"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same "}', "identical responses"),
    ('{"prompt": "p", "chosen": 3, "rejected": "y"}', "must be strings"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "contexts": [{"context": "c", "type": "mood", "preferred": "a"}]}',
     "unknown context type 'mood'"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "contexts": [{"context": "c", "type": "criteria", "preferred": "c"}]}',
     "label 'c' outside {a, b}"),
    ("[1, 2]", "not an object"),
    ('{"prompt": "p", "chosen": "x", ', "bad JSON"),
    (b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}', "non-UTF-8"),
]


def test_malformed_inputs_become_rejects_and_good_rows_survive(tmp_path):
    lines = []
    for i, (bad, _) in enumerate(BAD):
        lines += [json.dumps({**GOOD, "prompt": f"Tell me about tea {i}."}).encode(),
                  bad if isinstance(bad, bytes) else bad.encode()]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    store = ArtifactStore(tmp_path / "store")
    marker = parse_input(store.uri, "parsed/x", 0, (str(path), "pairwise", "rejects/x"), cfg=PreferenceConfig())
    rejects = store.read_shard("rejects/x", 0).to_pylist()
    assert len(rejects) == len(BAD) >= 10 and marker["rows"] == len(BAD)
    for (bad, reason), rej in zip(BAD, rejects):
        assert reason in rej["reason"], (reason, rej)
    assert [r["line"] for r in rejects] == [2 * i + 2 for i in range(len(BAD))]


def test_dataset_guarantees():
    pair, _ = to_pair({**GOOD, "criteria_chosen": "Prefer short answers.", "criteria_rejected": "Prefer detail."},
                      "sample")
    from tasks.preference import library_contexts

    contexts = pair["contexts"] + library_contexts(pair, load_library("builtin"))
    row = {"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"], "default": "a",
           "contexts": json.dumps(sorted(set(contexts))), "source": "t"}
    rows = expand(row, "train")
    assert {r["context_type"] for r in rows} >= {"criteria", "scenario", "none"}  # library adds a scenario
    assert sum(r["preferred"] == "a" for r in rows) == len(rows) / 2  # balanced labels
    for ctx in {r["context"] for r in rows}:  # both orders of every (pair, context)
        orders = {(r["response_a"], r["preferred"]) for r in rows if r["context"] == ctx}
        assert len(orders) == 2
    assert sum(r["context_type"] == "none" for r in rows) == 2
    assert reversal_pairs(rows) == {rows[0]["pair_id"]}
    dup = {**row, "b": row["b"] + " "}  # near-duplicate of the same pair
    kept, exact, near = dedup_pairs([row, dict(row), dup], 0.9)
    assert len(kept) == 1 and exact == 1 and near == 1


@pytest.mark.slow
def test_stage_splits_by_prompt_is_deterministic_and_reused(pretrained, tmp_path):
    from flows.plan import stage_call
    from tasks.preference import run_preference

    cfg, refs = pretrained
    call = stage_call("preference", cfg, cfg.store, refs)
    run_preference(cfg.store, **call)
    store = ArtifactStore(cfg.store)
    data = store.read_table(call["refs"]["data"]).to_pylist()
    train = {r["prompt"] for r in data if r["split"] == "train"}
    test = {r["prompt"] for r in data if r["split"] == "test"}
    assert train and test and not train & test
    folder = store.artifact_dir(call["refs"]["data"])
    assert pq.read_table(folder).num_rows == len(data)  # a plain Parquet dataset (HF `datasets` reads it)
    stats = {s["metric"]: s["value"] for s in store.read_table(call["refs"]["stats"]).to_pylist()}
    assert stats["label_a_share"] == 0.5 and stats["reversal_pairs"] > 0
    first = store.manifest(call["refs"]["data"])["checksum"]
    import shutil

    other = tmp_path / "again"
    shutil.copytree(cfg.store, other)
    for name in ("parsed", "data", "rejects", "stats", "reward_model", "eval"):
        shutil.rmtree(other / "artifacts" / call["refs"][name], ignore_errors=True)
    run_preference(str(other), **call)
    assert ArtifactStore(other).manifest(call["refs"]["data"])["checksum"] == first  # deterministic
    eval_manifest = store.manifest(call["refs"]["eval"])
    run_preference(cfg.store, **call)  # re-run on the same inputs: reused, not recomputed
    assert store.manifest(call["refs"]["eval"])["committed_at"] == eval_manifest["committed_at"]


def test_guarantees_are_counted_and_zero():
    from tasks.preference import guarantee_violations

    pair, _ = to_pair(GOOD, "pairwise")
    row = {"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"], "default": "a",
           "contexts": json.dumps([["Prefer short answers.", "criteria", "a", "input"]]), "source": "t"}
    rows = expand(row, "train")
    assert set(guarantee_violations(rows).values()) == {0}
    broken = rows[:-1] + [{**rows[0], "split": "test"}]
    violations = guarantee_violations(broken)
    assert violations["prompts_in_two_splits"] == 1 and violations["contexts_missing_an_order"] == 1


def test_lm_judgements_are_parsed():
    from tasks.preference import parse_judgement

    assert parse_judgement(" B, because it is shorter") == "b"
    assert parse_judgement("a") == "a"
    assert parse_judgement("neither really") is None


def test_context_lm_and_lora_reward_model_run(pretrained, tmp_path):
    """The GPU-profile options on the tiny model: LM-proposed contexts (tagged `lm` when the judge answers)
    and a LoRA reward model that trains and merges into a plain sequence-classification folder."""
    from tasks.preference import lm_contexts, load_context_lm, load_reward_model, train_reward_model
    from tasks.pretrain import model_dir

    cfg, refs = pretrained
    store = ArtifactStore(cfg.store)
    with model_dir(store, refs["model"]) as folder:
        lm = load_context_lm(folder)
        contexts = lm_contexts({"prompt": "p", "a": "x", "b": "y"}, lm, PreferenceConfig().context_lm_template)
        assert all(c[1] == "criteria" and c[2] in ("a", "b") and c[3] == "lm" for c in contexts)
        pcfg = PreferenceConfig(rm_lora=True, rm_epochs=1, rm_batch_size=2, rm_max_len=32)
        tok, model = load_reward_model(folder, pcfg)
    rows = expand({"prompt": "p", "a": "short", "b": "a much longer answer", "default": "a",
                   "contexts": "[]", "source": "t"}, "train")
    curve = train_reward_model(model, tok, rows, pcfg, __import__("logging").getLogger("t"))
    assert len(curve) == 1 and curve[0]["loss"] > 0
    model.merge_and_unload().save_pretrained(tmp_path / "rm")
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").config.num_labels == 1


def test_rpr_rows_bring_criteria_and_scenario_contexts():
    row = {"prompt": "Plan a trip.", "response_a": "Go by train.", "response_b": "Fly, then rent a car.",
           "criteria_x": "Prefer low emissions.", "criteria_y": "Prefer speed.", "scenario_x": "I care about the climate.",
           "scenario_y": "I have one free day.", "profile_0": "A student."}
    pair, reason = to_pair(row, "rpr")
    assert reason is None and pair["default"] is None
    assert sorted(pair["contexts"]) == sorted([
        ("Prefer low emissions.", "criteria", "a", "input"), ("Prefer speed.", "criteria", "b", "input"),
        ("I care about the climate.", "scenario", "a", "input"), ("I have one free day.", "scenario", "b", "input")])
    assert to_pair(row, "csv")[1] == "unknown input format 'csv'"
