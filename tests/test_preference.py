"""preference: malformed inputs -> rejects, dataset guarantees, determinism and reuse."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from tracecore.configs.schema import PreferenceConfig
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.preference import (
    dedup_pairs,
    expand,
    parse_input,
    reversal_pairs,
    to_pair,
)
from tracecore.tasks.preference_contexts import load_library

GOOD = {"prompt": "Tell me about tea.", "chosen": "Tea is a drink.",
        "rejected": "Tea is a drink made from leaves. "
        "It is grown in many countries. People drink it hot or cold."}
BAD = [  # (line content, reason fragment)
    ('{"prompt": "p", "chosen": "x"}', "missing field(s) ['rejected']"),
    ('{"chosen": "x", "rejected": "y"}', "missing field(s) ['prompt']"),
    ('{"prompt": "p", "chosen": "", "rejected": "y"}', "empty prompt or response"),
    ('{"prompt": "p", "chosen": "   ", "rejected": "y"}', "empty prompt or response"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same "}', "identical responses"),
    ('{"prompt": "p", "chosen": 3, "rejected": "y"}', "must be strings"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "contexts": [{"context": "c", "type": "mood", '
     '"preferred": "a"}]}',
     "unknown context type 'mood'"),
    ('{"prompt": "p", "chosen": "x", "rejected": "y", "contexts": [{"context": "c", "type": "criteria", '
     '"preferred": "c"}]}',
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
    marker = parse_input(store.uri, "parsed/x", 0, (str(path), "pairwise", "rejects/x"),
                         cfg=PreferenceConfig())
    rejects = store.read_shard("rejects/x", 0).to_pylist()
    assert len(rejects) == len(BAD) >= 10 and marker["rows"] == len(BAD)
    for (_, reason), rej in zip(BAD, rejects):
        assert reason in rej["reason"], (reason, rej)
    assert [r["line"] for r in rejects] == [2 * i + 2 for i in range(len(BAD))]


def test_dataset_guarantees():
    pair, _ = to_pair({**GOOD, "criteria_chosen": "Prefer a concise answer of one sentence.",
                       "criteria_rejected": "Prefer a detailed answer with several sentences."}, "sample")
    from tracecore.tasks.preference_contexts import library_contexts

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
    from conftest import run_planned, stage_plan

    cfg, _ = pretrained
    plan = stage_plan(cfg, "preference")
    refs = run_planned(cfg, "preference", plan)
    store = ArtifactStore(cfg.store)
    data = store.read_table(refs["data"]).to_pylist()
    train = {r["prompt"] for r in data if r["split"] == "train"}
    test = {r["prompt"] for r in data if r["split"] == "test"}
    assert train and test and not train & test
    train_ctx = {r["context"] for r in data if r["split"] == "train" and r["context"]}
    test_ctx = {r["context"] for r in data if r["split"] == "test" and r["context"]}
    assert test_ctx and not train_ctx & test_ctx  # held-out phrasings, not only held-out prompts
    folder = store.artifact_dir(refs["data"])
    assert pq.read_table(folder).num_rows == len(data)  # a plain Parquet dataset (HF `datasets` reads it)
    stats = {s["metric"]: s["value"] for s in store.read_table(refs["stats"]).to_pylist()}
    assert stats["label_a_share"] == 0.5 and stats["reversal_pairs"] > 0
    first = store.manifest(refs["data"])["checksum"]
    import shutil

    other = tmp_path / "again"
    shutil.copytree(cfg.store, other)
    for name in ("parsed", "data", "rejects", "stats", "reward_model", "accuracy"):
        shutil.rmtree(other / "artifacts" / refs[name], ignore_errors=True)
    run_planned(cfg, "preference", plan, str(other))
    assert ArtifactStore(other).manifest(refs["data"])["checksum"] == first  # deterministic
    eval_manifest = store.manifest(refs["accuracy"])
    run_planned(cfg, "preference", plan)  # re-run on the same inputs: reused, not recomputed
    assert store.manifest(refs["accuracy"])["committed_at"] == eval_manifest["committed_at"]


def test_guarantees_are_counted_and_zero():
    from tracecore.tasks.preference import guarantee_violations

    pair, _ = to_pair(GOOD, "pairwise")
    row = {"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"], "default": "a",
           "contexts": json.dumps([["Prefer short answers.", "criteria", "a", "input"]]), "source": "t"}
    rows = expand(row, "train")
    assert set(guarantee_violations(rows).values()) == {0}
    broken = rows[:-1] + [{**rows[0], "split": "test"}]
    violations = guarantee_violations(broken)
    assert violations["prompts_in_two_splits"] == 1 and violations["contexts_missing_an_order"] == 1


def test_lm_judgements_are_parsed():
    from tracecore.tasks.preference_contexts import parse_judgement

    assert parse_judgement(" B, because it is shorter") == "b"
    assert parse_judgement("a") == "a"
    assert parse_judgement("neither really") is None


def test_context_lm_and_lora_reward_model_run(pretrained, tmp_path):
    """The GPU-profile options on the tiny model: LM-proposed contexts (tagged `lm` when the judge answers)
    and a LoRA reward model that trains and merges into a plain sequence-classification folder."""
    from tracecore.tasks.models import model_dir
    from tracecore.tasks.preference_contexts import lm_contexts, load_context_lm
    from tracecore.tasks.reward_model import load_reward_model, train_reward_model

    cfg, refs = pretrained
    store = ArtifactStore(cfg.store)
    with model_dir(store, refs["pretrain.model"]) as folder:
        lm = load_context_lm(folder)
        contexts = lm_contexts({"prompt": "p", "a": "x", "b": "y"}, lm,
                               PreferenceConfig().context_lm_template)
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
           "criteria_x": "Prefer low emissions.", "criteria_y": "Prefer speed.",
           "scenario_x": "I care about the climate.",
           "scenario_y": "I have one free day.", "profile_0": "A student."}
    pair, reason = to_pair(row, "rpr")
    assert reason is None and pair["default"] is None
    assert sorted(pair["contexts"]) == sorted([
        ("Prefer low emissions.", "criteria", "a", "input"), ("Prefer speed.", "criteria", "b", "input"),
        ("I care about the climate.", "scenario", "a", "input"),
        ("I have one free day.", "scenario", "b", "input")])
    assert to_pair(row, "csv")[1] == "unknown input format 'csv'"


def test_no_context_records_only_where_a_preference_holds_without_context():
    """An RPR pair or a reversible sample pair has no context-free winner: no invented `a` label. A pairwise
    export's chosen side and a sample world's factual pair are unconditional preferences."""
    rpr, _ = to_pair({"prompt": "Plan a trip.", "response_a": "Train.", "response_b": "Fly.",
                      "criteria_x": "Prefer low emissions.", "criteria_y": "Prefer speed."}, "rpr")
    reversible, _ = to_pair({**GOOD, "criteria_chosen": "Prefer short answers.",
                             "criteria_rejected": "Prefer detail.", "reversible": True}, "sample")
    factual, _ = to_pair({**GOOD, "criteria_chosen": "Prefer correct answers.", "reversible": False},
                         "sample")
    pairwise, _ = to_pair(GOOD, "pairwise")
    for pair, expected in ((rpr, 0), (reversible, 0), (factual, 2), (pairwise, 2)):
        row = {**{k: pair[k] for k in ("prompt", "a", "b", "default")},
               "contexts": json.dumps(sorted(set(pair["contexts"]))), "source": "t"}
        assert sum(r["context_type"] == "none" for r in expand(row, "train")) == expected, pair


def test_reward_model_input_never_cuts_the_response(pretrained):
    """[context][prompt][response] over max_len: the prompt (then the context) gives way, the response stays
    whole."""
    from tracecore.tasks.models import model_dir
    from tracecore.tasks.reward_model import rm_ids
    from transformers import AutoTokenizer

    cfg, refs = pretrained
    with model_dir(ArtifactStore(cfg.store), refs["pretrain.model"]) as folder:
        tok = AutoTokenizer.from_pretrained(folder)
    response = "Tea is a drink made from leaves."
    ids = rm_ids(tok, "Prefer a short answer.", "Tell me " + "everything " * 80 + "about tea.", response, 100)
    tail = tok("[response] " + response, add_special_tokens=False)["input_ids"]
    assert len(ids) == 100 and ids[-len(tail):] == tail
    assert tok.decode(ids).count("Prefer a short answer") == 1  # the context survives too


def _scorer(reads_context: bool):
    """A stand-in reward: prefers the shorter response unless a context asking for detail is present."""
    def score(items):
        return [(len(r) if reads_context and "detail" in c else -len(r)) for c, _, r in items]
    return score


def test_preference_metrics_can_fail():
    """A context-blind scorer and a context-reading scorer must come out differently on every metric that
    claims to measure context use: conditioned accuracy and joint accuracy on reversal pairs. Ties are
    wrong."""
    from tracecore.tasks.reward_model import evaluate, is_correct

    assert not is_correct(0.0, "a") and not is_correct(0.0, "b") and is_correct(-1.0, "b")
    rows = []
    for i in range(6):
        pair = {"prompt": f"p{i}", "a": "short.", "b": "a long detailed answer.", "default": None,
                "contexts": json.dumps([["Prefer detail.", "criteria", "b", "input"],
                                        ["Prefer brevity.", "criteria", "a", "input"]]), "source": "t"}
        rows += expand(pair, "test")
    fact = {"prompt": "q", "a": "right.", "b": "wrong, and longer.", "default": "a", "contexts": "[]",
            "source": "t"}
    rows += expand(fact, "test")
    table = {(r["metric"], r["model"]): r for r in evaluate(_scorer(True), _scorer(False), rows)
             if r["context_type"] == "all"}
    assert table[("context_conditioned", "context_aware")]["accuracy"] == 1.0
    assert table[("context_conditioned", "context_blind")]["accuracy"] == 0.5
    assert table[("joint_reversal", "context_aware")]["accuracy"] == 1.0
    assert table[("no_context_unconditional", "context_aware")]["n"] == 2
    for r in table.values():
        assert 0.0 <= r["lo"] <= r["accuracy"] <= r["hi"] <= 1.0


def test_every_sample_axis_pole_has_training_and_held_out_phrasings(tmp_path):
    """Each reversible axis holds out one wording per pole and trains on the rest; the factual criteria, which
    never reverse, stay in training (held out, they let a blind model score above chance)."""
    from tracecore.tasks.preference_splits import heldout_phrasings
    from tracecore.tasks.text import normalize_text
    from tracecore.tasks.world import AXES, FACTUAL

    held, _ = heldout_phrasings(_sample_pairs(tmp_path), load_library("builtin"), 0.3)
    for poles in AXES.values():
        for phrasings in poles:
            assert sum(normalize_text(c) in held for c in phrasings) == 1, phrasings
    assert not held & {normalize_text(c) for c in FACTUAL}


def test_wilson_interval_keeps_the_estimate_inside_and_the_range():
    from tracecore.tasks.intervals import wilson

    for k, n in ((0, 10), (10, 10), (28, 28), (5, 10), (0, 1), (1, 3)):
        lo, hi = wilson(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
    assert wilson(28, 28)[1] == 1.0 and wilson(0, 10)[0] == 0.0


def test_reward_model_trains_once_per_comparison_not_per_response_order():
    """The dataset keeps both response orders (balanced labels for pairwise classifiers), but a Bradley-Terry
    model scores each response alone: -log s(r(win) - r(lose)) is the same example in either order, so
    training on both only doubles the cost."""
    from tracecore.tasks.preference import expand
    from tracecore.tasks.reward_model import bt_examples

    pair = {"prompt": "p", "a": "short", "b": "long answer", "default": "a",
            "contexts": json.dumps([["Be brief.", "criteria", "a", "library"],
                                    ["Be thorough.", "criteria", "b", "library"]])}
    rows = expand(pair, "train")
    assert len(rows) == 6  # 3 contexts (incl. none) x 2 orders
    examples = bt_examples(rows, with_context=True)
    assert sorted(examples) == sorted([("", "p", "short", "long answer"),
                                       ("Be brief.", "p", "short", "long answer"),
                                       ("Be thorough.", "p", "long answer", "short")])
    # without contexts, the reversal's two sides remain two examples
    blind = bt_examples(rows, with_context=False)
    assert sorted(blind) == sorted([("", "p", "short", "long answer"), ("", "p", "short", "long answer"),
                                    ("", "p", "long answer", "short")])



def _sample_pairs(tmp_path, n: int = 120) -> list[dict]:
    """The sample world's preference pairs, parsed as the stage parses them (own contexts + library)."""
    import random

    from tracecore.configs.schema import SampleConfig
    from tracecore.tasks.world import build_knowledge_base, build_preferences

    cfg = SampleConfig(preference_pairs=n)
    rng = random.Random(cfg.seed)
    facts, lexicon = build_knowledge_base(cfg, rng)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in build_preferences(cfg, facts, lexicon, rng)))
    store = ArtifactStore(tmp_path / "store")
    parse_input(store.uri, "parsed/x", 0, (str(path), "sample", "rejects/x"), cfg=PreferenceConfig())
    return store.read_shard("parsed/x", 0).to_pylist()


def test_each_context_text_enters_a_pair_once_and_only_on_the_pairs_own_features(tmp_path):
    """The library's criteria repeat the sample world's wordings: one copy per normalised text, or that
    context is scored twice. A library feature applies only where the pair's own contexts name it and it picks
    the side they labeled: the `english` proxy on a bulleted-list pair made 'the reader only understands
    Zelan' prefer
    the list (failed on the old code)."""
    from tracecore.tasks.text import normalize_text

    library = {e["context"]: e for e in load_library("builtin")}
    for pair in _sample_pairs(tmp_path):
        contexts = json.loads(pair["contexts"])
        texts = [normalize_text(c) for c, *_ in contexts]
        assert len(texts) == len(set(texts)), contexts
        own = {normalize_text(c) for c, _, _, src in contexts if src == "input"}
        features = {e["feature"] for t, e in library.items() if normalize_text(t) in own}
        for c, _, _side, src in contexts:
            if src == "library":
                assert library[c]["feature"] in features, (c, pair["a"], pair["b"])


def test_held_out_phrasings_favour_each_pole_equally_per_axis(tmp_path):
    """A context-blind scorer must score chance on the held-out contexts: per pair, as many held-out contexts
    favour each response (old code: the wording's hash alone held out, e.g., two concise phrasings and no
    detailed one, so the blind model's training-side bias decided its score)."""
    from tracecore.tasks.preference import records, reversal_pairs
    from tracecore.tasks.reward_model import blind_ceiling

    rows, stats = records(_sample_pairs(tmp_path), PreferenceConfig())
    test = [r for r in rows if r["split"] == "test" and r["context_type"] != "none"]
    assert test and blind_ceiling(test) == 0.5
    for ctype in ("criteria", "scenario"):
        sel = [r for r in test if r["context_type"] == ctype]
        assert sel and blind_ceiling(sel) == 0.5, ctype
    assert reversal_pairs(test) and stats["context_pole_conflicts"] == 0
    train_ctx = {r["context"] for r in rows if r["split"] == "train"}
    assert not train_ctx & {r["context"] for r in test}  # still phrasings no training record has


def test_an_unbalanced_held_out_set_shows_in_the_blind_ceiling():
    """The chance line is measured from the records: a context-ignoring scorer's best accuracy."""
    from tracecore.tasks.reward_model import blind_ceiling, evaluate

    pair = {"prompt": "p", "a": "short.", "b": "a long detailed answer.", "default": None, "source": "t",
            "contexts": json.dumps([["Prefer detail.", "criteria", "b", "input"],
                                    ["More detail.", "criteria", "b",
                                                                                  "input"],
                                    ["Prefer brevity.", "criteria", "a", "input"]])}
    rows = expand(pair, "test")
    assert blind_ceiling(rows) == 2 / 3
    table = evaluate(_scorer(True), _scorer(False), rows)
    assert table[0]["metric"] == "joint_reversal"  # the table leads with what a blind model cannot reach
    by = {(r["metric"], r["model"], r["context_type"]): r for r in table}
    assert by[("context_conditioned", "context_blind", "all")]["blind_ceiling"] == 2 / 3
    assert by[("context_conditioned", "context_blind", "all")]["chance"] == 0.5
    assert by[("joint_reversal", "context_aware", "all")]["chance"] == 0.25
    assert by[("joint_reversal", "context_aware", "all")]["blind_ceiling"] == 0.0
