"""ngram + memorization stages: exact counts, planted ground truth, task-gram rules, clear failures."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from tracecore.configs.schema import MemorizationConfig, NgramConfig, TaskSpec
from tracecore.flows.pipeline import run_stages
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.index_query import phrase_variants
from tracecore.tasks.memorization import candidate_pairs, load_task, task_grams, threshold
from tracecore.tasks.ngram import EmptyCorpusError
from tracecore.tasks.ngram_engine import VocabMismatchError, open_engine
from tracecore.tasks.ngram_table import packed_ngrams
from tracecore.tasks.runtime.registry import load_config


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, request):
    """The reduced sample world through ingest, tokenize and ngram (no model needed)."""
    from tracecore.flows.pipeline import execute_stage

    store_uri = str(tmp_path_factory.mktemp("ngram") / "store")
    cfg = load_config(str(request.config.rootpath / "tests/profile_test.yaml"), [], store=store_uri)
    config, refs = cfg.model_dump(mode="json"), {}
    for stage in ("sample", "ingest", "tokenize", "ngram"):
        refs.update(execute_stage(stage, config))
    return ArtifactStore(store_uri), cfg, refs


def tokenizer(store, refs):
    from tokenizers import Tokenizer

    with store.local_dir(refs["tokenize.tokenizer"]) as folder:
        return Tokenizer.from_file(f"{folder}/tokenizer.json")


def test_planted_phrase_counts_equal_ground_truth(indexed):
    from tracecore.tasks.index_query import phrase_variants

    store, _, refs = indexed
    tok = tokenizer(store, refs)
    with store.local_dir(refs["sample.sample"]) as folder:
        phrases = pq.read_table(f"{folder}/ground_truth/phrases.parquet").to_pylist()
        facts = pq.read_table(f"{folder}/ground_truth/facts.parquet").to_pylist()
    with open_engine(store, refs["ngram.index"]) as engine:
        for p in phrases:
            text = f"In Zelan, {p['source']} is said as {p['target']}."
            assert sum(engine.count(v)["count"] for v in phrase_variants(tok, text)) == p["frequency"], p
        for f in facts[:30]:  # the trivia-style template alone: a strict lower bound, never above the plant
            text = {"city": "Where was {} born? {}.", "occupation": "What does {} work as? {}.",
                    "year": "In which year was {} born? {}."}[f["attribute"]].format(f["entity"], f["value"])
            assert sum(engine.count(v)["count"] for v in phrase_variants(tok, text)) <= f["frequency"]


def test_exact_table_matches_infinigram(indexed):
    store, _, refs = indexed
    table = store.read_table(refs["ngram.counts"])
    assert set(table["n"].to_pylist()) == {1, 2, 3}
    rng = np.random.default_rng(0)
    rows = table.to_pylist()
    with open_engine(store, refs["ngram.index"]) as engine:
        for i in rng.choice(len(rows), 60, replace=False):
            assert engine.count(rows[i]["ngram"])["count"] == rows[i]["count"], rows[i]
    unigrams = sum(r["count"] for r in rows if r["n"] == 1)
    assert unigrams == store.manifest(refs["tokenize.tokens"])["tokens"]
    topk = store.read_table(refs["ngram.topk"]).to_pylist()
    assert topk[0]["rank"] == 1 and topk[0]["count"] == max(r["count"] for r in rows
                                                            if r["n"] == topk[0]["n"])


def test_a_lost_bucket_is_recomputed_alone(indexed):
    store, cfg, refs = indexed
    before = store.manifest(refs["ngram.counts"])["checksum"]
    store.drop_shard(refs["ngram.counts"], 3)
    store.fs.rm(store.manifest_path(refs["ngram.topk"]))
    run_stages(cfg, ["ngram"])
    manifest = store.manifest(refs["ngram.counts"])
    assert manifest["checksum"] == before and manifest["skipped_shards"] == cfg.ngram.buckets - 1 + len(
        store.markers(refs["ngram.counts_map"]))


def test_ngrams_never_cross_documents():
    docs = [np.array([1, 2, 3], np.uint64), np.array([4, 5], np.uint64)]
    keys = packed_ngrams(docs, 2)
    assert sorted(int(k[0]) for k in keys) == sorted([1 | 2 << 16, 2 | 3 << 16, 4 | 5 << 16])
    assert not keys[:, 1].any()


@pytest.mark.parametrize("bits", [16, 32])
def test_every_counting_path_equals_an_independent_count(bits):
    """Unigrams by bincount, keys of <= 32 and <= 64 bits as machine words, 128-bit keys row-wise; then the
    reduce's merge of sorted runs and its count order: all equal a Counter over in-document n-grams."""
    from collections import Counter

    import pyarrow as pa
    from tracecore.tasks.ngram_table import (
        by_count_descending,
        flat_ids,
        key_width,
        ngram_counts,
        sum_sorted_runs,
        unmixed_words,
        unpack,
    )

    rng = np.random.default_rng(bits)
    top = (1 << bits) - 2
    docs = [rng.choice([0, 1, 2, 7, top, top - 1], size=int(rng.integers(0, 9))).tolist() for _ in range(60)]
    column = pa.array(docs, type=pa.list_(pa.uint16() if bits == 16 else pa.uint32()))
    half = len(docs) // 2
    for n in (1, 2, 3, 4):
        truth = Counter(tuple(d[i:i + n]) for d in docs for i in range(len(d) - n + 1))
        runs = []
        for part in (column.slice(0, half), column.slice(half)):  # two map partitions, one a sliced column
            flat, bounds = flat_ids(part)
            runs.append(ngram_counts(flat, bounds[1:], n, bits))
        mixed, key1, counts = sum_sorted_runs(*(np.concatenate(words) for words in zip(*runs)))
        key0 = unmixed_words(mixed, key1, key_width(n, bits))
        keys, order = np.stack([key0, key1], axis=1), by_count_descending(counts)
        got = [(tuple(ids), int(c)) for ids, c in zip(unpack(keys[order], n, bits), counts[order])]
        assert dict(got) == truth, (n, bits)
        assert [c for _, c in got] == sorted(truth.values(), reverse=True)
        ranked = [(-int(c), int(m), int(k)) for m, k, c in zip(mixed[order], key1[order], counts[order])]
        assert ranked == sorted(ranked)  # count descending, then mixed key (the reduce's documented order)


def test_key_mixing_is_a_bijection_and_fills_bucket_ranges_evenly():
    """The map orders keys by a mixed (hashed) key whose ranges are the reduce buckets: unmixing must give
    every key back (32-, 48-, 64-bit and two-word keys, edge values included), and buckets of a skewed key set
    must be
    even."""
    from tracecore.tasks.ngram_table import bucket_bounds, mixed_words, unmixed_words

    rng = np.random.default_rng(0)
    for width, top in ((32, (1 << 32) - 1), (48, (1 << 48) - 1), (64, (1 << 64) - 1), (128, (1 << 64) - 1)):
        key0 = np.r_[np.array([0, 1, top], np.uint64), rng.integers(0, top, 10_000, dtype=np.uint64,
                                                                    endpoint=True)]
        key1 = rng.integers(0, 1 << 40, len(key0),
                            dtype=np.uint64) if width == 128 else np.zeros(len(key0), np.uint64)
        mixed = mixed_words(key0, key1, width).astype(np.uint64)
        assert np.array_equal(unmixed_words(mixed, key1, width), key0), width
        if width == 48:  # a 48-bit key stays within 48 bits, so a reduce can pack a 16-bit count beside it
            assert int(mixed.max()) < 1 << 48
    skewed = np.arange(50_000, dtype=np.uint64) << np.uint64(16)  # packed n-grams sharing a low word
    for width in (32, 48):
        sizes = np.diff(bucket_bounds(np.sort(mixed_words(skewed, None, width).astype(np.uint64)), width, 16))
        assert sizes.sum() == 50_000 and sizes.min() > 0.8 * 50_000 / 16, width


@pytest.mark.parametrize("bits", [16, 32])
def test_packing_is_exact_for_wide_ids(bits):
    """u32 ids (vocab > 65,535) of a 4-gram need 128 bits: two key words, unpacked to the same ids."""
    from tracecore.tasks.ngram_table import unpack

    top = (1 << bits) - 2
    docs = [np.array([top, 70_000 % top, 3, top - 1, 5], np.uint64)]
    keys = packed_ngrams(docs, 4, bits)
    assert unpack(keys, 4, bits) == [[int(x) for x in docs[0][i:i + 4]] for i in range(2)]


def test_task_gram_rules():
    assert task_grams("Where was Anan Galthergal born?", 2) == ["Where was", "was Anan", "Anan Galthergal",
                                                                  "Galthergal born"]
    assert task_grams("Mivel.", 2) == ["Mivel"]  # shorter than n: one gram (documented deviation)
    item = {"input": "the red house", "output": "the red roof"}
    assert candidate_pairs(item, 2) == []  # x and y share "the red": the item yields no pairs
    pairs = candidate_pairs({"input": "Where was Anan born?", "output": "Mivel"}, 2)
    assert ("was Anan", "Mivel") in pairs and len(pairs) == 3
    cfg = MemorizationConfig()
    assert threshold(cfg, TaskSpec(name="t", kind="qa")) == 0.6  # cosine itself, not 100 x cosine
    assert threshold(cfg.model_copy(update={"n": 3}), TaskSpec(name="t", kind="qa")) == 0.9


def test_malformed_task_records_are_rejected(tmp_path):
    rows = [{"id": "ok", "question": "Where was A born?", "answer": "B"},
            {"id": "no-answer", "question": "Q?"}, {"question": "Q?", "answer": ""}, ["not", "an", "object"]]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    items, rejects = load_task(TaskSpec(name="qa", kind="qa"), str(path), 0)
    assert [i["id"] for i in items] == ["ok"]
    assert [(r["line"], r["reason"].split(":")[1].strip()[:20]) for r in rejects] == [
        (2, "missing or empty fie"), (3, "missing or empty fie"), (4, "record is a list, no"),
        (5, "bad JSON")]
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": 5}))
    assert "integer 'answer' index" in load_task(TaskSpec(name="mc", kind="multiple_choice"), str(mc),
                                                 0)[1][0]["reason"]


def test_empty_corpus_and_vocab_mismatch_fail_before_work(indexed, tmp_path):
    import pyarrow as pa

    store, _, refs = indexed
    empty = ArtifactStore(tmp_path / "empty")
    empty.write_shard("tokens/e", 0, pa.table({"doc_id": pa.array([], pa.string()),
                                               "tokens": pa.array([], pa.list_(pa.uint16())),
                                               "n_tokens": pa.array([], pa.int32())}), tokens=0)
    empty.commit("tokens/e", {"tokens": 0}, expected_shards=1)
    with pytest.raises(EmptyCorpusError, match="holds no tokens"):
        from tracecore.tasks.ngram import check_inputs

        check_inputs(empty, NgramConfig(), "tokens/e", 400)
    from tracecore.tasks.memorization import STAGE
    from tracecore.tasks.runtime.stage import plan_stage, run_stage

    other = store.manifest(refs["ngram.index"])
    manifest_path = store.manifest_path(refs["ngram.index"])
    store.fs.pipe(manifest_path, json.dumps({**other, "vocab_size": other["vocab_size"] + 1}).encode())
    try:
        plan = plan_stage(STAGE, indexed[1], {**refs, "pretrain.model": "model/not-needed"}, store)
        with pytest.raises(VocabMismatchError, match="was built with"):
            run_stage(STAGE, indexed[1].memorization, plan, store.uri)
    finally:
        store.fs.pipe(manifest_path, json.dumps(other).encode())
    assert not any(a.startswith("memorization_pairs/") for a in store.list_artifacts())



def test_overlap_rule_checks_short_answers_and_multiple_choice_input_is_the_question():
    """A y shorter than n words is still checked against x (the answer must not be copyable from x), and a
    multiple-choice x holds the question only (its options contain the answer by construction)."""
    assert candidate_pairs({"input": "Was Mivel the birthplace of Anan?", "output": "Mivel"}, 2) == []
    assert candidate_pairs({"input": "Where was Anan born?", "output": "in Mivel town"}, 5) != []
    mc = {"id": "m", "question": "Which city?", "choices": ["Mivel", "Oran"], "answer": 0}
    from tracecore.tasks.taskfiles import to_item

    item, reason = to_item("multiple_choice", mc)
    assert reason is None and item["input"] == "Which city?" and item["output"] == "Mivel"


def test_the_lm_is_scored_on_the_tasks_prompt_template_not_raw_x(tmp_path):
    """The paper scores P_LM(s_y | x) with x in the evaluation prompt ("Question: ... Answer:"); raw x asks a
    model for a continuation it is never evaluated on (failed on the old code: items had no prompt)."""
    from tracecore.tasks.taskfiles import load_task

    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Where was Mivel born?", "answer": "Daro"}\n')
    (item,), _ = load_task(TaskSpec(name="qa", kind="qa"), str(path), 0)
    assert item["prompt"] == "Question: Where was Mivel born?\nAnswer:"
    assert item["input"] == "Where was Mivel born?"
    (own,), _ = load_task(TaskSpec(name="qa", kind="qa", prompt="Q: {input} A:"), str(path), 0)
    assert own["prompt"] == "Q: Where was Mivel born? A:"
    translation = {t.name: t for t in MemorizationConfig().tasks}["translation"]
    assert translation.lm_prompt("the red house") == "English phrase: the red house\nZelan phrase:"
    with pytest.raises(ValueError, match="must contain '{input}'"):
        TaskSpec(name="qa", kind="qa", prompt="Question:")


def test_scores_cover_every_item_smoothed_and_the_cooccurring_subset_labelled():
    """Items whose pairs never co-occur keep a (smoothed) task-gram probability in rho over all items; the
    paper's rho over co-occurring items is reported beside it with its own count."""
    from tracecore.tasks.memorization import REPORT_COLUMNS, item_scores, score_table

    pairs = []
    for i in range(12):
        c_xy = 0 if i < 4 else i
        pairs.append({"task": "qa", "item_id": f"q{i}", "input": "x", "prompt": "x", "frequency": None,
                      "s_x": "a b",
                      "s_y": f"y{i}", "c_x": 50, "c_y": 5, "c_xy": c_xy, "approx": False, "log_p_inf": -1.0})
    rows = item_scores(pairs)
    assert all(np.isfinite(r["log_p_t_smoothed"]) for r in rows)
    assert sum(r["cooccurring"] for r in rows) == 8
    lm_rows = [{**r, "model": "m", "parameters": 1, "log_p_lm": r["log_p_t_smoothed"] + 0.01 * k}
               for k, r in enumerate(rows)]
    (score,) = score_table(lm_rows, MemorizationConfig(bootstrap=50))
    assert score["n_all"] == 12 and score["n_cooccurring"] == 8 and "n_items" not in score
    assert score["spearman_all"] > 0.9 and score["spearman"] > 0.9
    # every reported column is filled
    assert set(REPORT_COLUMNS) <= set(score), set(REPORT_COLUMNS) - set(score)
    assert score["spearman_all_lo"] <= score["spearman_all"] <= score["spearman_all_hi"]


def test_constructed_agreement_gives_positive_rho(indexed):
    """A case whose answer is known: the sample world plants each QA fact a known number of times, and a
    'model' whose log-probability of the answer is, by design, the log of that planted frequency agrees with
    the corpus. The method (pairs -> infini-gram counts -> P_T -> Spearman) must then give rho > 0, so a
    negative rho on real data is a finding about the model or the data, not an artifact of the method."""
    from tracecore.tasks.memorization import candidate_pairs, count_chunk, item_scores, load_task, score_table

    store, _, refs = indexed
    spec = TaskSpec(name="qa", kind="qa")
    with store.local_dir(refs["sample.sample"]) as folder:
        items, _ = load_task(spec, f"{folder}/tasks/qa.jsonl", 0)
    pairs = [{"task": "qa", "item_id": it["id"], "input": it["input"], "prompt": it["prompt"],
              "frequency": it["frequency"], "s_x": sx, "s_y": sy} for it in items
                  for sx, sy in candidate_pairs(it, 2)]
    count_chunk(store.uri, "test/constructed", 0, (refs["ngram.index"], refs["tokenize.tokenizer"], pairs),
                100, 50_000)
    rows = item_scores(store.read_shard("test/constructed", 0).to_pylist())
    designed = [{**r, "model": "planted", "parameters": 1, "log_p_lm": float(np.log(r["frequency"]))}
                for r in rows]
    (score,) = score_table(designed, MemorizationConfig(bootstrap=200))
    assert score["n_cooccurring"] >= 20 and score["spearman"] > 0.3 and score["spearman_lo"] > 0, score
    assert score["spearman_all"] > 0.3, score


def test_thresholds_below_the_papers_are_said_for_user_tasks():
    from tracecore.tasks.memorization import threshold_warnings

    toy = MemorizationConfig(align_threshold_short=0.0, tasks=[TaskSpec(name="qa", kind="qa"),
                                                              TaskSpec(name="mine", kind="qa",
                                                                       path="my/qa.jsonl")])
    (warning,) = threshold_warnings(toy)
    assert "mine" in warning and "0.6" in warning
    assert threshold_warnings(MemorizationConfig(tasks=[TaskSpec(name="mine", kind="qa",
                                                                 path="my/qa.jsonl")])) == []


def _loop_bootstrap_spearman(lm, ref, n_boot, seed):
    """The reference: one resample at a time, as the paper's percentile bootstrap reads."""
    from scipy import stats

    rng, boots = np.random.default_rng(seed), []
    for _ in range(n_boot):
        idx = rng.integers(0, len(lm), len(lm))
        if len(set(ref[idx])) > 1 and len(set(lm[idx])) > 1:
            boots.append(stats.spearmanr(lm[idx], ref[idx]).statistic)
    return np.percentile(boots, 2.5), np.percentile(boots, 97.5)


def test_vectorized_bootstrap_equals_one_resample_at_a_time():
    """`correlations` draws all resamples at once (it was ~12 s of the default run); same draws, same
    interval,
    ties (integer counts) ranked as averages, constant resamples skipped."""
    from scipy import stats
    from tracecore.tasks.memorization_scores import correlations

    rng = np.random.default_rng(3)
    ref = rng.integers(0, 6, 40).astype(float)  # heavy ties, and some resamples of 40 are near-constant
    lm = ref + rng.normal(0, 2, 40)
    got = correlations(lm, ref, 300, seed=7)
    lo, hi = _loop_bootstrap_spearman(lm, ref, 300, 7)
    assert got["spearman_lo"] == pytest.approx(lo,
                                               abs=1e-9) and got["spearman_hi"] == pytest.approx(hi, abs=1e-9)
    assert got["spearman"] == pytest.approx(stats.spearmanr(lm, ref).statistic)
    assert got["kendall_tau_distance"] == pytest.approx((1 - stats.kendalltau(lm, ref).statistic) / 2)
    const = correlations(np.arange(5.0), np.array([1.0, 1, 1, 1, 2]), 200, seed=0)  # many constant resamples
    assert -1 <= const["spearman_lo"] <= const["spearman_hi"] <= 1


def test_ngram_cli_count_docs_and_cnf(indexed):
    """`tracecore ngram count/docs/cnf` on the test store: counts equal a regex scan of the documents (both
    tokenizations summed), every listed document contains the phrase, co-occurrence equals the engine's."""
    import re

    from conftest import run_cli
    from tracecore.tasks.ngram_engine import open_engine

    store, _, refs = indexed
    phrase = "was born in the year"
    texts = store.read_table(refs["ingest.documents"]).column("text").to_pylist()
    expected = sum(len(re.findall(r"(?:^| )" + re.escape(phrase) + r"(?=\W|$)", t)) for t in texts)
    args = ["--store", store.uri, "--index", refs["ngram.index"], "--json"]
    counted = json.loads(run_cli("ngram", "count", phrase, *args).stdout)
    assert counted["count"] == expected > 0 and counted["text"] == phrase
    assert sum(f["count"]
               for f in counted["forms"]) == counted["count"] and all(f["tokens"] for f in counted["forms"])
    found = json.loads(run_cli("ngram", "docs", phrase, *args, "--limit", "50").stdout)
    assert found["occurrences"] == expected and 0 < len(found["documents"]) <= 50
    ids = {d["id"] for d in found["documents"]}
    by_id = {r["id"]: r for r in store.read_table(refs["ingest.documents"]).to_pylist() if r["id"] in ids}
    for d in found["documents"]:
        assert phrase in by_id[d["id"]]["text"] and phrase in d["snippet"]
        assert (d["file"], d["line"]) == (by_id[d["id"]]["file"], by_id[d["id"]]["line"])
    cooc = json.loads(run_cli("ngram", "cnf", "was born", "AND", "year", *args, "--window", "20").stdout)
    with open_engine(store, refs["ngram.index"]) as engine:
        tok = tokenizer(store, refs)
        direct = engine.count_cnf([phrase_variants(tok, "was born"), phrase_variants(tok, "year")],
                                  max_diff_tokens=20)
    assert cooc["count"] == direct["count"] > 0 and cooc["approx"] is False
    text = run_cli("ngram", "count", phrase, "--store", store.uri, "--index", refs["ngram.index"])
    assert text.returncode == 0 and f": {expected}" in text.stdout
    bad = run_cli("ngram", "cnf", "a", "AND", "--store", store.uri, "--index", refs["ngram.index"])
    assert bad.returncode == 2 and "empty clause" in bad.stderr


def test_ngram_batch_file_answers_exactly_what_single_calls_do(indexed, tmp_path):
    """`--file`: one process, one engine, JSON lines equal to the single calls' output; a malformed line is an
    error object naming its file and line, the other lines still answered, exit 1."""
    from conftest import run_cli

    store, _, refs = indexed
    args = ["--store", store.uri, "--index", refs["ngram.index"]]
    phrases = ["was born in the year", "the capital of", "zzz unseen phrase"]
    (tmp_path / "count.txt").write_text("\n".join(phrases) + "\n\n")
    batch = run_cli("ngram", "count", "--file", str(tmp_path / "count.txt"), *args)
    assert batch.returncode == 0, batch.stderr
    singles = [json.loads(run_cli("ngram", "count", p, *args, "--json").stdout) for p in phrases]
    assert [json.loads(line) for line in batch.stdout.splitlines()] == singles
    (tmp_path / "docs.txt").write_text("was born in the year\n")
    docs = run_cli("ngram", "docs", "--file", str(tmp_path / "docs.txt"), *args, "--limit", "5")
    single = json.loads(run_cli("ngram", "docs", "was born in the year", *args, "--limit", "5",
                                "--json").stdout)
    assert json.loads(docs.stdout) == single
    (tmp_path / "cnf.txt").write_text('"was born" AND year\na AND\n"the capital" AND of\n')
    cnf = run_cli("ngram", "cnf", "--file", str(tmp_path / "cnf.txt"), *args, "--window", "20")
    rows = [json.loads(line) for line in cnf.stdout.splitlines()]
    assert cnf.returncode == 1 and len(rows) == 3
    assert rows[0] == json.loads(run_cli("ngram", "cnf", "was born", "AND", "year", *args, "--window", "20",
                                         "--json").stdout)
    assert rows[1]["line"] == 2 and rows[1]["error"].startswith(f"{tmp_path / 'cnf.txt'}:2: ")
    assert "empty clause" in rows[1]["error"] and "count" in rows[2]
    both = run_cli("ngram", "count", "x", "--file", str(tmp_path / "count.txt"), *args)
    assert both.returncode == 2 and "not both" in both.stderr


def test_more_buckets_for_a_larger_corpus_give_the_same_exact_table(indexed, tmp_path):
    """Bounded reduce memory: `ngram.bucket_tokens` adds buckets as the corpus grows (a reduce task holds
    ~1/buckets of the distinct n-grams); the table and top-k are the same as with the configured minimum."""
    store, cfg, refs = indexed
    tokens = store.manifest(refs["tokenize.tokens"])["tokens"]
    small = cfg.model_copy(update={"ngram": cfg.ngram.model_copy(update={"bucket_tokens": tokens // 40})})
    refs_small = run_stages(small, ["ngram"])
    manifest = store.manifest(refs_small["ngram.counts"])
    assert manifest["buckets"] >= 40 > cfg.ngram.buckets and manifest["shards"] == manifest["buckets"]

    def rows(ref):
        table = store.read_table(ref)
        return sorted(zip(table["n"].to_pylist(), map(tuple, table["ngram"].to_pylist()),
                          table["count"].to_pylist()))

    assert rows(refs_small["ngram.counts"]) == rows(refs["ngram.counts"])
    topk = [(r["n"], r["count"]) for r in store.read_table(refs_small["ngram.topk"]).to_pylist()]
    assert topk == [(r["n"], r["count"]) for r in store.read_table(refs["ngram.topk"]).to_pylist()]


def test_token_shards_larger_than_map_tokens_are_cut_into_row_ranges(indexed):
    """Bounded map memory: a token shard of more than `ngram.map_tokens` tokens is counted as several row
    ranges (no document cut, every row once), and the exact table is the same as with whole shards."""
    store, cfg, refs = indexed
    tokens_ref = refs["tokenize.tokens"]
    largest = max(m["tokens"] for m in store.markers(tokens_ref))
    ngram = cfg.ngram.model_copy(update={"map_tokens": max(1_000, largest // 5)})
    small = cfg.model_copy(update={"ngram": ngram})
    refs_small = run_stages(small, ["ngram"])
    parts = store.manifest(refs_small["ngram.counts_map"])["partitions"]
    shards = store.markers(tokens_ref)
    assert len(parts) > len(shards)
    for marker in shards:  # each shard's ranges tile its rows exactly
        ranges = [(lo, hi) for s, lo, hi in parts if s == marker["shard"]]
        assert ranges[0][0] == 0 and ranges[-1][1] == marker["rows"]
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(ranges))

    def rows(ref):
        table = store.read_table(ref)
        return sorted(zip(table["n"].to_pylist(), map(tuple, table["ngram"].to_pylist()),
                          table["count"].to_pylist()))

    assert rows(refs_small["ngram.counts"]) == rows(refs["ngram.counts"])


def test_a_map_partition_is_read_one_bucket_at_a_time(indexed):
    """Each bucket is its own row group of a map partition, so a reduce task reads 1/buckets of it."""
    store, _, refs = indexed
    path = store.shard_path(refs["ngram.counts_map"], 0)
    with store.fs.open(path, "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
    buckets = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
    assert meta.num_row_groups > 1 and all(s.min == s.max for s in buckets)


def test_index_groups_are_bounded_by_tokens():
    from tracecore.tasks.ngram import group_shards

    assert group_shards([8, 2], 2, 10) == [[0], [1]]
    assert group_shards([8] * 13, 2, 10) == [[i] for i in range(13)]  # a group never grows with the corpus
    assert group_shards([3] * 12, 2, 10) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert group_shards([3] * 4, 2, 100) == [[0, 1], [2, 3]]  # small corpora: `shard_groups` in parallel
    assert group_shards([30], 2, 10) == [[0]]  # one shard larger than the bound is a group of its own


def test_smaller_index_groups_answer_the_same_counts(indexed):
    store, cfg, refs = indexed
    tokens = store.manifest(refs["tokenize.tokens"])["tokens"]
    small = cfg.model_copy(update={"ngram": cfg.ngram.model_copy(update={"group_tokens": tokens // 6})})
    refs_small = run_stages(small, ["ngram"])
    assert store.manifest(refs_small["ngram.index"])["shards"] > store.manifest(refs["ngram.index"])["shards"]
    rows = store.read_table(refs["ngram.topk"]).to_pylist()
    with open_engine(store, refs_small["ngram.index"]) as engine:
        assert [engine.count(r["ngram"])["count"] for r in rows] == [r["count"] for r in rows]


def test_indexer_cpus_share_the_cluster_by_group_size():
    """`ngram.index_cpus: auto`: one group gets every thread of a host (measured 3.3 -> 1.5 s for 8 M tokens
    on
    2 cores), unequal groups get shares by their tokens, never 0, never more than one host has."""
    from tracecore.tasks.ngram import indexer_cpus

    assert indexer_cpus("auto", [8_000_000], host_threads=2) == [2]
    assert indexer_cpus("auto", [8_000_000, 2_000_000], host_threads=2) == [2, 1]
    assert indexer_cpus("auto", [10] * 30, host_threads=2) == [1] * 30
    assert indexer_cpus("auto", [1_000_000], host_threads=64, total_threads=512) == [64]
    assert indexer_cpus(3, [5, 5], host_threads=2) == [3, 3]


def test_our_suffix_array_driver_builds_the_packages_index_byte_for_byte(tmp_path):
    """`build_suffix_array` runs infini-gram's binary steps itself (no interpreter per group): its table must
    be the package driver's (`python -m infini_gram.indexing`), on 1 or 2 cpus and when memory forces 2
    batches."""
    from tracecore.tasks.ngram import build_suffix_array, run_package_indexer, suffix_array_jobs

    rng = np.random.default_rng(0)
    docs = [np.r_[0xFFFF, rng.integers(0, 500, 300)].astype("<u2") for _ in range(1_000)]  # 301 k symbols
    offsets = (np.cumsum([0] + [len(d) for d in docs[:-1]]) * 2).astype("<u8")
    data = np.concatenate(docs).tobytes()
    assert len(suffix_array_jobs(len(data), 8 * len(data) // 2 + 8, 2)) == 2  # memory for half: two batches

    def table(name: str, build) -> bytes:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenized.0").write_bytes(data)
        (folder / "offset.0").write_bytes(offsets.tobytes())
        build(folder)
        if name.startswith("ours"):  # temporary parts removed (the package's driver leaves an empty tmp/)
            assert sorted(p.name for p in folder.iterdir()) == ["offset.0", "table.0", "tokenized.0"]
        return (folder / "table.0").read_bytes()

    reference = table("package", lambda f: run_package_indexer(f, 1, 2))
    assert len(reference) > 0
    assert table("ours-1", lambda f: build_suffix_array(f, 2**30, 1)) == reference
    assert table("ours-2", lambda f: build_suffix_array(f, 2**30, 2)) == reference
    assert table("ours-2-batches", lambda f: build_suffix_array(f, 8 * len(data) // 2 + 8, 2)) == reference


def test_a_failing_indexer_step_names_the_step_and_folder(tmp_path):
    from tracecore.tasks.ngram import build_suffix_array

    (tmp_path / "tokenized.0").write_bytes(b"\xff\xff\x01")  # not a whole number of u16 tokens
    (tmp_path / "offset.0").write_bytes(np.zeros(1, "<u8").tobytes())
    with pytest.raises(RuntimeError, match=f"infini-gram indexer step .* failed in {tmp_path}") as err:
        build_suffix_array(tmp_path, 2**30, 1)
    # the binary's assertion, not its backtrace
    assert "\n" not in str(err.value) and "token_width" in str(err.value)


def test_map_partitions_with_and_without_a_second_key_word_reduce_together(tmp_path):
    """A map partition writes key1 only when one of its n-grams needs 64+ bits, and narrow counts: the reduce
    reads partitions of both shapes and still equals a Counter (u32 ids, n = 3: key1 holds the third id)."""
    from collections import Counter

    import pyarrow as pa
    from tracecore.tasks.ngram_table import count_partition, reduce_bucket

    store = ArtifactStore(str(tmp_path / "store"))
    rng = np.random.default_rng(1)
    shards = [[[5, 7, 0, 0, 0]] * 3,  # the third id of every trigram is 0: no second word
              [rng.integers(0, 70_000, 12).tolist() for _ in range(5)]]
    for i, docs in enumerate(shards):
        tokens = pa.array(docs, type=pa.list_(pa.uint32()))
        store.write_shard("tokens/t", i,
                          pa.table({"doc_id": [str(k) for k in range(len(docs))], "tokens": tokens,
                                                  "n_tokens": pa.array([len(d) for d in docs], pa.int32())}))
    for i, docs in enumerate(shards):
        count_partition(store.uri, "map/m", i, ("tokens/t", i, 0, len(docs)), 3, 4)
    assert "key1" not in pq.read_schema(store.shard_path("map/m", 0)).names
    assert "key1" in pq.read_schema(store.shard_path("map/m", 1)).names
    got = Counter()
    for bucket in range(4):
        reduce_bucket(store.uri, "counts/c", bucket, ("map/m", 2, 32))
        for row in store.read_shard("counts/c", bucket).to_pylist():
            got[tuple(row["ngram"])] += row["count"]
    truth = Counter(tuple(d[i:i + n]) for docs in shards for d in docs for n in (1, 2, 3)
                    for i in range(len(d) - n + 1))
    assert got == truth


def test_bootstrap_resamples_items_so_repeated_targets_do_not_narrow_the_interval():
    """Translation scores five targets per item: rows of one item are not independent. An item repeated five
    times carries no more evidence than the item once, so its interval must be about as wide as the
    one-row-per-item interval, not sqrt(5) narrower as a row bootstrap makes it."""
    from tracecore.tasks.memorization_scores import correlations

    rng = np.random.default_rng(0)
    ref = rng.normal(size=30)
    lm = ref + rng.normal(0, 1.5, 30)
    once = correlations(lm, ref, 2000, seed=1)
    items = np.repeat(np.arange(30), 5)
    by_item = correlations(np.repeat(lm, 5), np.repeat(ref, 5), 2000, seed=1, groups=items)
    by_row = correlations(np.repeat(lm, 5), np.repeat(ref, 5), 2000, seed=1)
    width = {name: r["spearman_hi"] - r["spearman_lo"] for name, r in
             (("once", once), ("by_item", by_item), ("by_row", by_row))}
    assert width["by_item"] > 1.6 * width["by_row"], width
    assert abs(width["by_item"] - width["once"]) < 0.25 * width["once"], width
    assert by_item["bootstrap_units"] == 30
    uneven = correlations(lm[:12], ref[:12], 200, seed=2,
                          groups=np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 7]))
    assert -1 <= uneven["spearman_lo"] <= uneven["spearman_hi"] <= 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_target_logprobs_equal_the_full_forward(family):
    """The LM head runs only where a target is predicted; the sums must equal log-softmax over the full
    logits (right-padded batch, targets of different lengths)."""
    import torch
    from tracecore.tasks.memorization import target_logprobs
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)) if family == "llama"
                                              else
             GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4))).eval()
    ctx, tgt = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]
    seqs = [c + t for c, t in zip(ctx, tgt)]
    ids, mask = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        expected = [float(logp[j, torch.arange(len(c) - 1, len(c) + len(t) - 1), torch.tensor(t)].sum())
                    for j, (c, t) in enumerate(zip(ctx, tgt))]
        got = target_logprobs(model, ids, mask, ctx, tgt)
    assert got == pytest.approx(expected, abs=1e-5)


# ---- output tracing and the query server ------------------------------------------------------------------
def brute_force_trace(docs: list[list[int]], ids: list[int], min_span: int, max_count: int):
    """Reach, maximal spans and coverage by scanning every document for every span (the reference)."""
    def occurrences(span):
        return sum(d[i:i + len(span)] == span for d in docs for i in range(len(d) - len(span) + 1))

    ends = []
    for i in range(len(ids)):
        end = i
        while end < len(ids) and occurrences(ids[i:end + 1]):
            end += 1
        ends.append(end)
    spans, previous = [], 0
    for i, end in enumerate(ends):
        if end > previous and end - i >= min_span and occurrences(ids[i:end]) <= max_count:
            spans.append({"l": i, "r": end, "count": occurrences(ids[i:end])})
        previous = max(previous, end)
    covered = [any(i <= j < e and e - i >= min_span for i, e in enumerate(ends)) for j in range(len(ids))]
    return ends, spans, sum(covered) / len(ids)


def generations(store, refs, n: int = 6) -> list[list[int]]:
    """Made-up 'model outputs': random tokens around pieces of corpus documents (known to occur)."""
    import random

    docs = store.read_table(refs["tokenize.tokens"]).column("tokens").to_pylist()
    rng = random.Random(1)
    out = []
    for _ in range(n):
        d, e = rng.choice(docs), rng.choice(docs)
        a = rng.randrange(max(1, len(d) - 30))
        noise = [rng.randrange(300) for _ in range(9)]
        out.append(noise[:4] + d[a:a + 20] + noise[4:7] + e[:10] + noise[7:])
    return docs, out


@pytest.mark.parametrize("path", ["engine", "counts"])
def test_output_spans_equal_a_brute_force_scan(indexed, path, monkeypatch):
    """The engine's creativity()/attribute() (u16) and the count walk (the paired-index path, forced here on
    the same index) both give the spans and coverage of an exhaustive scan of the token shards."""
    from tracecore.tasks import output_trace

    store, _, refs = indexed
    docs, outputs = generations(store, refs)
    with open_engine(store, refs["ngram.index"]) as engine:
        if path == "counts":
            monkeypatch.setattr(output_trace, "PairedEngine", type(engine))
        for ids in outputs:
            ends, spans, covered = brute_force_trace(docs, ids, 5, 10)
            assert output_trace.reach(engine, ids) == ends
            assert output_trace.maximal_spans(engine, ids, 5, 10) == spans and spans
            assert output_trace.coverage(ends, 5) == pytest.approx(covered)
            if path == "engine":  # the spans are the set the engine's own attribute() returns
                found = engine.attribute(ids, [], 5, 10, False)["spans"]
                assert [{k: s[k] for k in ("l", "r", "count")} for s in found] == spans


def test_trace_text_lists_each_spans_documents_and_the_file_path_equals_single_calls(indexed, tmp_path):
    from conftest import run_cli

    store, _, refs = indexed
    docs = store.read_table(refs["ingest.documents"]).to_pylist()
    text = f"Unheard-of opening words. {docs[3]['text'][:150]}"
    args = ["--store", store.uri, "--index", refs["ngram.index"], "--min-span", "6"]
    single = json.loads(run_cli("trace", "text", text, *args).stdout)
    assert single["spans"] and 0 < single["covered"] < 1 and single["tokens"] > 0
    for span in single["spans"]:
        assert span["tokens"] >= 6 and span["count"] <= 10 and span["documents"]
        by_id = {d["id"]: d for d in docs}
        assert all(span["text"] in by_id[d["id"]]["text"] and (d["file"], d["line"]) ==
                   (by_id[d["id"]]["file"], by_id[d["id"]]["line"]) for d in span["documents"])
    lines = [json.dumps({"generation": text}), json.dumps({"generation": "x"})]
    (tmp_path / "gen.jsonl").write_text("\n".join(lines))
    batch = run_cli("trace", "text", "--file", str(tmp_path / "gen.jsonl"), "--field", "generation", *args)
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert rows[0] == single and rows[1]["spans"] == [] and len(rows) == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": 1}\n')
    bad = run_cli("trace", "text", "--file", str(tmp_path / "bad.jsonl"), *args)
    assert bad.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:2: no string field 'text'" in bad.stderr


def post(url: str, body) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_server_answers_exactly_what_the_cli_prints_and_refuses_malformed_queries(indexed):
    """count / search_docs / cnf / attribution equal the CLI's JSON; prob and ntd equal the engine's counts;
    a malformed request is a 400 with a one-line error; the default bind is loopback only."""
    import threading

    from conftest import run_cli
    from tracecore.tasks import index_query as query
    from tracecore.tasks.index_server import Limits, make_server

    store, _, refs = indexed
    index, args = refs["ngram.index"], ["--store", store.uri, "--index", refs["ngram.index"]]
    with query.opened(store, index) as (engine, tok):
        limits = Limits(max_query_chars=200, max_body_bytes=4096)
        server = make_server(store, index, engine, tok, limits=limits)
        assert server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            phrase = "was born in the year"
            assert post(url, {"query_type": "count", "query": phrase}) == (200, json.loads(
                run_cli("ngram", "count", phrase, *args, "--json").stdout))
            docs = json.loads(run_cli("ngram", "docs", phrase, *args, "--limit", "4", "--json").stdout)
            assert post(url, {"query_type": "search_docs", "query": phrase, "maxnum": 4}) == (200, docs)
            assert post(url, {"query_type": "cnf", "query": '"was born" AND year', "window": 20}) == (
                200, json.loads(run_cli("ngram", "cnf", "was born", "AND", "year", *args, "--window", "20",
                                        "--json").stdout))
            text = store.read_table(refs["ingest.documents"]).column("text")[5].as_py()[:120]
            traced = json.loads(run_cli("trace", "text", text, *args, "--min-span", "6").stdout)
            assert post(url, {"query_type": "attribution", "query": text, "min_span": 6}) == (200, traced)
            status, p = post(url, {"query_type": "prob", "query": "was born in the"})
            ids = tok.encode(" was born in the", add_special_tokens=False).ids
            assert status == 200 and (p["prompt_cnt"], p["cont_cnt"]) == (
                engine.count(ids[:-1])["count"], engine.count(ids)["count"]) and 0 < p["prob"] <= 1
            status, n = post(url, {"query_type": "ntd", "query": "was born in the"})
            assert status == 200 and n == {"text": "was born in the", **{k: v for k, v in engine.ntd(
                ids).items() if k in ("prompt_cnt", "approx")}, "result_by_token_id": {
                    str(i): {**r, "token": tok.decode([i])}
                    for i, r in engine.ntd(ids)["result_by_token_id"].items()}}
            malformed = [(b"{not json", "the body is not JSON"), ({"query": "x"}, "'query_type' must"),
                         ({"query_type": "grep", "query": "x"}, "unknown query_type 'grep'"),
                         ({"query_type": "count", "query": "  "}, "'query' is empty"),
                         ({"query_type": "count", "query": "x" * 201}, "201 characters > the server's 200"),
                         ({"query_type": "search_docs", "query": "x", "maxnum": 0}, "'maxnum' must be in"),
                         ({"query_type": "cnf", "query": "a AND"}, "empty clause")]
            for body, message in malformed:
                status, reply = post(url, body)
                assert status == 400 and message in reply["error"] and "\n" not in reply["error"], body
            status, reply = post(url, {"query_type": "count", "query": "x" * 5000})
            assert status == 413 and "> the server's 4096" in reply["error"]
        finally:
            server.shutdown()
            server.server_close()
