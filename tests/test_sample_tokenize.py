"""Sample world ground truth and tokenization on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tracecore.configs.schema import SampleConfig
from tracecore.tasks.tokenize import TokenizerError, check_user_tokenizer
from tracecore.tasks.world import FACT_TEMPLATES, write_sample

SMALL = SampleConfig(n_entities=30, max_fact_frequency=40, n_parallel_phrases=15, filler_documents=200,
                     instructions=160, preference_pairs=20, haystacks=5, haystack_sentences=20,
                     corpus_files=3)


def corpus_text(folder: Path) -> str:
    import gzip

    return "\n".join(json.loads(line)["text"] for f in sorted((folder / "corpus").glob("*.jsonl.gz"))
                     for line in gzip.decompress(f.read_bytes()).splitlines())


def test_sample_world_is_deterministic(tmp_path):
    write_sample(SMALL, tmp_path / "a"), write_sample(SMALL, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
                         for f in files)
    write_sample(SMALL.model_copy(update={"seed": 1}), tmp_path / "c")
    assert (tmp_path / "c/tasks/qa.jsonl").read_bytes() != (tmp_path / "a/tasks/qa.jsonl").read_bytes()


def test_planted_frequencies_match_the_corpus(tmp_path):
    counts = write_sample(SMALL, tmp_path)
    text = corpus_text(tmp_path)
    facts = pq.read_table(tmp_path / "ground_truth/facts.parquet").to_pylist()
    assert len(facts) == counts["facts"] == 90
    freqs = sorted(f["frequency"] for f in facts)
    assert freqs[0] == 1 and freqs[-1] == 40  # Zipf spread from 1 to the configured maximum
    for fact in facts:
        found = sum(text.count(t.format(name=fact["entity"], value=fact["value"]))
                    for t in FACT_TEMPLATES[fact["attribute"]])
        assert found == fact["frequency"], fact
    phrases = pq.read_table(tmp_path / "ground_truth/phrases.parquet").to_pylist()
    for p in phrases:
        assert text.count(f"In Zelan, {p['source']} is said as {p['target']}.") == p["frequency"]


def test_repeated_list_documents_are_added_without_changing_the_rest(tmp_path):
    """Induction-head training data: each added document repeats its list; every other document is the
    same as without them (their own random stream), so all planted counts stay true."""
    import gzip

    def docs(folder):
        return [json.loads(line) for f in sorted((folder / "corpus").glob("*.jsonl.gz"))
                for line in gzip.decompress(f.read_bytes()).splitlines()]

    write_sample(SMALL, tmp_path / "plain")
    write_sample(SMALL.model_copy(update={"repeated_list_documents": 25}), tmp_path / "lists")
    plain, lists = docs(tmp_path / "plain"), docs(tmp_path / "lists")
    added = [d for d in lists if d["id"].startswith("rep-")]
    assert len(added) == 25 and [d for d in lists if not d["id"].startswith("rep-")] == plain
    for d in added:
        first, again = d["text"].removeprefix("List: ").split(". Again: ")
        assert first + "." == again


def test_tasks_instructions_preferences_haystacks_have_public_schemas(tmp_path):
    write_sample(SMALL, tmp_path)
    def rows(rel: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / rel).read_text().splitlines()]

    mc = rows("tasks/multiple_choice.jsonl")[0]
    assert mc["choices"][mc["answer"]] and len(mc["choices"]) == 4
    pool = rows("instructions/train.jsonl")
    assert {"instruction", "input", "output"} <= set(pool[0]) and len({r["family"] for r in pool}) == 8
    assert any(r["quality"] == "low" for r in pool) and any(r["near_duplicate_of"] for r in pool)
    assert {r["family"] for r in rows("instructions/eval.jsonl")} == {r["family"] for r in pool}
    prefs = rows("preferences/pairs.jsonl")
    assert {"prompt", "chosen", "rejected"} <= set(prefs[0])
    assert any(p["reversible"] and p["criteria_rejected"]
               for p in prefs) and any(not p["reversible"] for p in prefs)
    for hay in rows("longctx/haystacks.jsonl"):
        assert f"is {hay['answer']}." in hay["context"]


@pytest.fixture
def documents(tmp_path):
    write_sample(SMALL, tmp_path / "world")

    from tracecore.flows.pipeline import run_stages
    from tracecore.tasks.runtime.registry import validate_config

    cfg = validate_config({"store": str(tmp_path / "store"),
                           "ingest": {"paths": [str(tmp_path / "world/corpus/*.jsonl.gz")]},
                           "tokenize": {"vocab_size": 500, "train_docs": 1000}})
    return cfg, run_stages(cfg, ["ingest"])["ingest.documents"]


def test_tokenize_trains_bpe_and_roundtrips(documents):
    from tracecore.flows.pipeline import run_stages
    from tracecore.storage.store import ArtifactStore
    from transformers import AutoTokenizer

    cfg, docs_ref = documents
    refs = run_stages(cfg, ["tokenize"])
    store = ArtifactStore(cfg.store)
    tokens = store.read_table(refs["tokenize.tokens"])
    assert str(tokens.schema.field("tokens").type) == "list<element: uint16>"
    manifest = store.manifest(refs["tokenize.tokens"])
    assert manifest["tokens"] == sum(tokens.column("n_tokens").to_pylist()) > 0
    assert manifest["inputs"] == {"documents": docs_ref} and manifest["tokens_per_second"] > 0
    with store.local_dir(refs["tokenize.tokenizer"]) as folder:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(tok) <= 500 and tok.eos_token == "<|endoftext|>"
    texts = store.read_table(docs_ref).column("text").to_pylist()
    assert tok.decode(tokens.column("tokens")[0].as_py()) == texts[0]


def test_parallel_encoding_is_on_where_a_worker_would_otherwise_idle():
    """auto, with fewer shards than 2 per worker thread: on for a shard larger than an even share of the work
    (it alone outlasts the others, whose workers then idle), off for the rest, so the cores are not
    oversubscribed while every worker still has a shard (measured: a 7.7 M- and a 2 M-token shard on 2
    workers, 0.86-0.91 M tokens/s with both on, 0.90-0.95 with only the large one). With more shards: the last
    shards of the queue (one fewer than the threads), which run while other workers have nothing left to
    take."""
    from tracecore.tasks.tokenize import parallel_shards

    assert parallel_shards("auto", [80, 20], threads=2) == [True, False]
    assert parallel_shards("auto", [20, 80], threads=2) == [False, True]
    assert parallel_shards("auto", [50, 50], threads=2) == [False, False]
    assert parallel_shards("auto", [10, 10, 30], threads=2) == [False, False, True]
    assert parallel_shards("auto", [5], threads=2) == [True]
    assert parallel_shards("auto", [5], threads=1) == [True]
    assert parallel_shards("auto", [1] * 13, threads=2) == [False] * 12 + [True]
    assert parallel_shards("auto", [1] * 13, threads=4) == [False] * 10 + [True] * 3
    assert parallel_shards("auto", [5], threads=0) == [False]
    assert parallel_shards(True, [1] * 3, threads=2) == [True] * 3
    assert parallel_shards(False, [5], threads=2) == [False]


def test_parallel_encoding_gives_the_same_tokens_and_restores_the_environment(documents, monkeypatch):
    """`tokenize.parallel_encode` (the library's thread pool inside a task) changes speed only."""
    from tracecore.flows.pipeline import run_stages
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.tokenize import tokenize_shard

    cfg, docs_ref = documents
    refs = run_stages(cfg, ["tokenize"])
    store = ArtifactStore(cfg.store)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for parallel in (True, False):
        tokenize_shard(cfg.store, f"check_{parallel}/x", 0, (docs_ref, refs["tokenize.tokenizer"], parallel),
                       64)
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        got = store.read_shard(f"check_{parallel}/x", 0)
        assert got.equals(store.read_shard(refs["tokenize.tokens"], 0)), parallel


def test_overlapped_encoding_gives_the_batches_in_order_with_the_same_ids(documents):
    """With the tokenizers pool on, the next batch encodes in a helper thread while this one is converted (the
    pool idled meanwhile): same ids, same order, at every batch boundary, also for no texts at all."""
    import pyarrow as pa
    from tokenizers import Tokenizer
    from tracecore.flows.pipeline import run_stages
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.tokenize import encode_column

    cfg, docs_ref = documents
    refs = run_stages(cfg, ["tokenize"])
    store = ArtifactStore(cfg.store)
    with store.local_dir(refs["tokenize.tokenizer"]) as folder:
        tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    texts = store.read_shard(docs_ref, 0, columns=["text"]).column(0).to_pylist()[:50]
    expected = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    for batch_size in (1, 7, 50, 64):
        got = encode_column(tok, texts, batch_size, pa.uint16(), overlap=True).to_pylist()
        assert got == expected == encode_column(tok, texts, batch_size, pa.uint16(),
                                                overlap=False).to_pylist()
    assert encode_column(tok, [], 8, pa.uint16(), overlap=True).to_pylist() == []


def test_user_tokenizer_path_is_checked(tmp_path):
    with pytest.raises(TokenizerError, match="tokenize.tokenizer_path: .* has no tokenizer.json"):
        check_user_tokenizer(str(tmp_path))


def user_tokenizer_folder(folder, config: dict | None, special: dict | None = None):
    """A fast-tokenizer folder as Hugging Face writes it, with the given tokenizer_config /
    special_tokens_map."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([f"the cat {n} sat" for n in range(200)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False))
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        if content is not None:
            (folder / name).write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("config, special", [
    ({"eos_token": "</s>"}, None),
    ({"eos_token": {"content": "</s>", "__type": "AddedToken"}}, None),
    ({}, {"eos_token": "</s>"}),
])
def test_user_tokenizer_with_an_eos_token_is_accepted(tmp_path, config, special):
    folder = user_tokenizer_folder(tmp_path / "tok", config, special)
    assert check_user_tokenizer(str(folder)) == folder


@pytest.mark.parametrize("config, special, message", [
    ({}, None, "defines no eos_token"),
    (None, None, "defines no eos_token"),
    ({"eos_token": "<eos>"}, None, "eos_token '<eos>' is not in its vocabulary"),
])
def test_user_tokenizer_without_a_usable_eos_token_is_refused(tmp_path, config, special, message):
    folder = user_tokenizer_folder(tmp_path / "tok", config, special)
    with pytest.raises(TokenizerError, match=f"tokenize.tokenizer_path: .*{message}"):
        check_user_tokenizer(str(folder))


def test_a_corrupt_tokenizer_json_is_named(tmp_path):
    folder = user_tokenizer_folder(tmp_path / "tok", {"eos_token": "</s>"})
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenize.tokenizer_path: .*tokenizer.json cannot be loaded"):
        check_user_tokenizer(str(folder))


def test_a_user_tokenizer_is_checked_when_the_run_is_planned_before_any_stage_works(documents, tmp_path):
    """A tokenizer without a usable eos_token fails the plan, before ingest spends anything, and the check
    does not build the tokenizer (the flow process built it in the tokenize stage: 0.05-0.1 s of a 1.3 s stage
    at
    10^6 tokens, and every task builds it again anyway)."""
    from tokenizers import Tokenizer
    from tracecore.flows.plan import plan_pipeline
    from tracecore.storage.store import ArtifactStore

    cfg, _ = documents
    folder = user_tokenizer_folder(tmp_path / "tok", {"eos_token": "<eos>"})
    bad = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"tokenizer_path": str(folder)})})
    with pytest.raises(TokenizerError, match="eos_token '<eos>' is not in its vocabulary"):
        plan_pipeline(bad, ArtifactStore(bad.store), ["ingest", "tokenize"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    built = []
    original = Tokenizer.from_file
    try:
        Tokenizer.from_file = staticmethod(lambda *a, **k: built.append(a) or original(*a, **k))
        check_user_tokenizer(str(folder))
    finally:
        Tokenizer.from_file = original
    assert not built


def test_a_tokenizer_json_the_library_cannot_build_fails_the_stage_in_one_line(documents, tmp_path):
    from tracecore.flows.pipeline import run_stages

    cfg, _ = documents
    folder = user_tokenizer_folder(tmp_path / "tok", {"eos_token": "</s>"})
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["type"] = "NoSuchModel"
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    bad = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"tokenizer_path": str(folder)})})
    with pytest.raises(TokenizerError,
                       match=r"^tokenize.tokenizer_path: .*tokenizer.json cannot be loaded \(") as err:
        run_stages(bad, ["tokenize"])
    assert "\n" not in str(err.value)


def test_checking_a_user_tokenizer_does_not_import_transformers(tmp_path):
    """The check runs in the flow process before the tokenize stage's work: importing transformers there cost
    1.4 s (measured), more than the whole stage's encoding at 10^6 tokens."""
    folder = user_tokenizer_folder(tmp_path / "tok", {"eos_token": "</s>"})
    code = ("import sys; from tracecore.tasks.tokenize import check_user_tokenizer; "
            f"check_user_tokenizer({str(folder)!r}); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("split_digits", [False, True])
def test_split_digits_gives_one_token_per_digit(tmp_path, split_digits):
    """The needle task copies a passkey: with split_digits no number is merged into a multi-digit token."""
    from tracecore.tasks.tokenize import train_bpe
    from transformers import AutoTokenizer

    texts = [f"The secret passkey of Abc is {n}. Again {n} and {n * 7}." for n in range(10_000, 12_000)]
    train_bpe(texts, 400, 2, tmp_path, split_digits)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "The passkey of Abc is 27094."
    pieces = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert tok.decode(tok(text)["input_ids"]) == text
    if split_digits:
        assert digit_pieces == list("27094") and "Ġ" in pieces
    else:
        assert len(digit_pieces) < 5  # byte-level BPE merges frequent digit runs


def test_held_out_and_evaluation_items_are_disjoint_from_the_pool(tmp_path):
    """No held-out instruction and no QA / multiple-choice evaluation question is in the training pool,
    compared
    after lower-casing and stripping punctuation (the tiny profile's world: 3,000 pool records)."""
    from tracecore.tasks.eval_quality import load_tasks
    from tracecore.tasks.instructions import load_pool
    from tracecore.tasks.runtime.registry import load_config
    from tracecore.tasks.text import instruction_key, normalize_text

    write_sample(load_config("tiny").sample, tmp_path)
    pool, _ = load_pool(str(tmp_path / "instructions" / "train.jsonl"))
    held_out, _ = load_pool(str(tmp_path / "instructions" / "eval.jsonl"))
    seen = {instruction_key(r) for r in pool}
    assert not [r for r in held_out if instruction_key(r) in seen]
    inputs = {normalize_text(r["input"]) for r in pool}
    tasks = load_tasks(str(tmp_path), 100, pool)
    assert len(tasks["qa"]) >= 50 and len(tasks["multiple_choice"]) >= 50
    for name in ("qa", "multiple_choice"):
        assert not [r for r in tasks[name] if normalize_text(r["question"]) in inputs], name


def test_instruction_families_are_zipf_sized_and_the_held_out_set_is_balanced(tmp_path):
    """Real instruction pools are dominated by a few task families; the rare ones are where cluster-balanced
    selection (TAGCOS) can differ from random. Held-out items are balanced, so every family counts alike."""
    from collections import Counter

    write_sample(SMALL.model_copy(update={"instructions": 2400, "n_entities": 400}), tmp_path)
    pool = [json.loads(x) for x in (tmp_path / "instructions/train.jsonl").read_text().splitlines()]
    sizes = sorted(Counter(r["family"] for r in pool).values(), reverse=True)
    # Zipf exponent 1: rank 1 / rank 8 = 8 in expectation
    assert len(sizes) == 8 and sizes[0] / sizes[-1] >= 5
    assert sizes[0] / len(pool) > 0.28 and sizes[-1] >= 30  # head ~37 %, the rarest still learnable
    held_out = Counter(json.loads(x)["family"]
                       for x in (tmp_path / "instructions/eval.jsonl").read_text().splitlines())
    assert len(set(held_out.values())) == 1 and set(held_out) == {r["family"] for r in pool}
    write_sample(SMALL.model_copy(update={"instructions": 2400, "n_entities": 400,
                                          "family_zipf_exponent": 0.0}),
                 tmp_path / "flat")
    flat = Counter(json.loads(x)["family"]
                   for x in (tmp_path / "flat/instructions/train.jsonl").read_text().splitlines())
    assert max(flat.values()) / min(flat.values()) < 1.3  # near-duplicates copy their source's family


def test_multiple_choice_items_are_not_the_qa_items_again(tmp_path):
    """The memorization readout scores (input, answer) pairs per task: a multiple-choice item with the QA
    item's question and answer is the same measurement reported twice (failed on the old code: every MC item
    was a
    QA item). The MC questions are worded apart, as MMLU-style items are."""
    from tracecore.tasks.taskfiles import to_item

    write_sample(SampleConfig(), tmp_path)
    rows = {kind: [json.loads(line)
                   for line in (tmp_path / "tasks" / f"{kind}.jsonl").read_text().splitlines()]
            for kind in ("qa", "multiple_choice")}
    items = {kind: {(i["input"], i["output"]) for i in (to_item(kind, r)[0] for r in rs)}
             for kind, rs in rows.items()}
    assert items["qa"] and items["multiple_choice"] and not items["qa"] & items["multiple_choice"]
    qa_inputs = {x.lower() for x, _ in items["qa"]}
    assert not any(x.lower() in qa_inputs for x, _ in items["multiple_choice"])
