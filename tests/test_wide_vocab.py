"""A tokenizer with more than 65,535 tokens (Llama 3, Qwen 2, Gemma sizes) through ingest -> tokenize -> ngram
->
memorization: u32 ids end to end, with counts equal to an independent scan of the token shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.registry import load_config

FILLER = 66_000  # placeholder tokens first, so every real word has an id above 65,535
pytestmark = pytest.mark.timeout(600)


def word_level_tokenizer(texts: list[str], folder: Path) -> int:
    """A locally built Hugging Face tokenizer (word level, whitespace + punctuation split) of > 65,535
    tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "[UNK]": 2}
    vocab |= {f"filler{i}": 3 + i for i in range(FILLER)}
    vocab |= {w: len(vocab) + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                            unk_token="[UNK]").save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, request):
    from tracecore.flows.pipeline import execute_stage

    root = tmp_path_factory.mktemp("wide")
    profile = str(request.config.rootpath / "tests/profile_test.yaml")
    cfg = load_config(profile, [], store=str(root / "store"))
    config, refs = cfg.model_dump(mode="json"), {}
    for stage in ("sample", "ingest"):
        refs.update(execute_stage(stage, config))
    store = ArtifactStore(cfg.store)
    texts = store.read_table(refs["ingest.documents"]).column("text").to_pylist()
    size = word_level_tokenizer(texts, root / "tokenizer")
    cfg = load_config(profile, [f"tokenize.tokenizer_path={root / 'tokenizer'}"], store=cfg.store)
    config = cfg.model_dump(mode="json")
    for stage in ("tokenize", "pretrain", "ngram", "memorization"):
        refs.update(execute_stage(stage, config))
    return store, refs, size


def token_docs(store, refs) -> list[list[int]]:
    return [list(d) for d in store.read_table(refs["tokenize.tokens"]).column("tokens").to_pylist()]


def test_ids_above_65535_are_stored_as_uint32(wide):
    store, refs, size = wide
    assert size > 65_535
    assert "uint32" in store.markers(refs["tokenize.tokens"])[0]["schema"]
    assert store.manifest(refs["ngram.index"])["token_dtype"] == "u32"
    assert max(max(d) for d in token_docs(store, refs) if d) > 65_535


def test_exact_table_equals_an_independent_scan(wide):
    store, refs, _ = wide
    scan = Counter(tuple(d[i:i + n]) for d in token_docs(store, refs) for n in (1, 2, 3)
                   for i in range(len(d) - n + 1))
    table = store.read_table(refs["ngram.counts"]).to_pylist()
    assert len(table) == len(scan)
    assert all(scan[tuple(r["ngram"])] == r["count"] for r in table)


def test_index_counts_equal_an_independent_scan(wide):
    from tracecore.tasks.ngram_engine import open_engine

    store, refs, _ = wide
    docs = token_docs(store, refs)
    scan = Counter(tuple(d[i:i + 3]) for d in docs for i in range(len(d) - 2))
    grams = [g for g, _ in scan.most_common(5)] + [g for g, c in scan.items() if c == 1][:5]
    with open_engine(store, refs["ngram.index"]) as engine:
        for gram in grams:
            assert engine.count(list(gram))["count"] == scan[gram], gram
        assert engine.count([65_999, 66_000])["count"] == 0  # filler ids never occur
        pairs = Counter(tuple(d[i:i + 2]) for d in docs for i in range(len(d) - 1))
        gram = grams[0]
        result = engine.infgram_prob([5, gram[0], gram[1]], gram[2])  # id 5 (a filler) never occurs
        assert result["suffix_len"] == 2 and result["prob"] == pytest.approx(scan[gram] / pairs[gram[:2]])
        assert engine.count_cnf([[[gram[0]]], [[gram[1]]]])["count"] > 0  # adjacent tokens co-occur
        assert engine.count_cnf([[[gram[0]]], [[65_999]]])["count"] == 0


def test_memorization_scores_with_a_wide_vocabulary(wide):
    store, refs, _ = wide
    scores = {s["task"]: s for s in store.read_table(refs["memorization.scores"]).to_pylist()}
    assert scores["qa"]["n_all"] > 0 and scores["qa"]["n_cooccurring"] > 0
    pairs = store.read_table(refs["memorization.pairs"]).to_pylist()
    assert any(p["c_xy"] > 0 for p in pairs) and np.isfinite([p["c_x"] for p in pairs]).all()
