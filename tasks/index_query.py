"""Queries of a committed infini-gram index: `tracecore ngram count | docs | cnf` and the trace stage.

What infini-gram users do all day, without writing Python against the engine: exact counts of a phrase
(both tokenizations a phrase has in running text: with its leading space, and bare at a document start),
the documents that contain it (id, file, line and a snippet, fetched in one batched engine call), and
co-occurrence counts of phrases within a window of tokens (approximate when a clause is too frequent,
which the engine flags).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tracecore.configs.base import ConfigError
from tracecore.storage.store import ArtifactStore


def phrase_variants(tok, text: str) -> list[list[int]]:
    """Token ids of a phrase mid-text (leading space) and at document start (no space).

    When the space is a token of its own (small vocabularies), the no-space ids already match
    both forms, and counting both would double count."""
    spaced = tok.encode(" " + text, add_special_tokens=False).ids
    bare = tok.encode(text, add_special_tokens=False).ids
    return [bare] if spaced[-len(bare):] == bare else [spaced, bare]


def latest_index(store: ArtifactStore) -> str:
    """The most recently committed n-gram index of the store."""
    refs = [r for r in store.list_artifacts() if r.startswith("ngram_index/") and store.is_committed(r)]
    if not refs:
        raise FileNotFoundError(f"no committed n-gram index in store {store.uri} (run the ngram stage first)")
    return max(refs, key=lambda r: store.manifest(r)["committed_at"])


@contextlib.contextmanager
def opened(store: ArtifactStore, index_ref: str) -> Iterator[tuple]:
    """(engine, tokenizer) of an index: the tokenizer it was built with, so query ids match its ids."""
    from tokenizers import Tokenizer
    from tracecore.tasks.ngram_engine import open_engine

    with store.local_dir(store.manifest(index_ref)["tokenizer"]) as folder:
        tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    with open_engine(store, index_ref) as engine:
        yield engine, tok


def forms(tok, text: str) -> list[list[int]]:
    """The token ids of a phrase mid-text and at a document start (one form when they coincide)."""

    return phrase_variants(tok, text)


def count(engine, tok, text: str) -> dict:
    """`{"text", "count" (all tokenizations summed), "forms": [{"tokens", "count"}...]}`."""
    per_form = [{"tokens": ids, "count": engine.count(ids)["count"]} for ids in forms(tok, text)]
    return {"text": text, "count": sum(f["count"] for f in per_form), "forms": per_form}


def cnf_clauses(terms: list[str]) -> list[list[str]]:
    """`a AND b OR c` -> [[a], [b, c]] (AND of ORs, as infini-gram's CNF)."""
    clauses, current = [], []
    for term in terms + ["AND"]:
        if term == "AND":
            if not current:
                raise ConfigError(f"cnf: empty clause in {' '.join(terms)!r}")
            clauses.append(current)
            current = []
        elif term != "OR":
            current.append(term)
    return clauses


def cnf(engine, tok, clauses: list[list[str]], window: int) -> dict:
    """Co-occurrence of AND-ed clauses (each an OR of phrases, every tokenization included) within `window`
    tokens; `approx` is the engine's flag for clauses too frequent to enumerate."""
    query = [[ids for text in clause for ids in forms(tok, text)] for clause in clauses]
    result = engine.count_cnf(query, max_diff_tokens=window)
    return {"clauses": clauses, "window": window, "count": result["count"], "approx": result["approx"]}


def raw_engine(engine) -> tuple:
    """(raw engine, encode): suffix-array ranks and documents live on the raw engine, which a u32 index
    queries in paired symbols."""
    from tracecore.tasks.ngram_engine import PairedEngine

    return (engine.engine, engine.encode) if isinstance(engine, PairedEngine) else (engine, list)


def phrase_ranks(engine, ids: list[int], limit: int | None = None) -> tuple[int, list[tuple]]:
    """(count, suffix-array ranks as `get_docs_by_ranks_2` takes them) of a token sequence; at most `limit`
    ranks are listed (a frequent phrase has millions)."""
    raw, encode = raw_engine(engine)
    query = encode(ids)
    found = raw.find(query)
    ranks: list[tuple] = []
    for shard, (lo, hi) in enumerate(found["segment_by_shard"]):
        stop = hi if limit is None else min(hi, lo + limit - len(ranks))
        ranks += [(shard, r, len(query), 0) for r in range(lo, stop)]
    return found["cnt"], ranks


RANKS_PER_CALL = 256  # the engine starts a thread per rank: one call for 70k ranks aborted the process


def docs_by_ranks(raw, ranks: list[tuple]) -> list[dict]:
    """The engine's batched document retrieval (the `_2` call: infini-gram 2.6's `get_docs_by_ranks` calls a
    method its C++ engine lacks), in batches of RANKS_PER_CALL."""
    return [h for i in range(0, len(ranks),
                             RANKS_PER_CALL) for h in raw.get_docs_by_ranks_2(ranks[i:i + RANKS_PER_CALL])]


def docs(store: ArtifactStore, index_ref: str, engine, tok, text: str, limit: int, context: int = 80) -> dict:
    """Up to `limit` documents containing the phrase (any tokenization): id, file, line and a snippet."""
    raw, _ = raw_engine(engine)
    ranks = [r for ids in forms(tok, text) for r in phrase_ranks(engine, ids)[1]]
    doc_ixs: list[int] = []
    for start in range(0, len(ranks), 4 * limit):  # batched engine calls until `limit` distinct documents
        # the `_2` call: infini-gram 2.6's get_docs_by_ranks calls a method its C++ engine lacks
        hits = raw.get_docs_by_ranks_2(ranks[start:start + 4 * limit])
        doc_ixs = list(dict.fromkeys(doc_ixs + [h["doc_ix"] for h in hits]))[:limit]
        if len(doc_ixs) == limit:
            break
    located = document_rows(store, index_ref, doc_ixs)
    rows = [{**located[ix], "snippet": snippet(located[ix].pop("text"), text, context)} for ix in doc_ixs]
    return {"text": text, "occurrences": len(ranks), "documents": rows}


def document_rows(store: ArtifactStore, index_ref: str, doc_ixs: list[int]) -> dict[int, dict]:
    """Global document numbers of the index -> the ingest stage's (id, file, line, text): index groups hold
    token shards in order, and token shard k holds documents shard k's rows in their order (tokenize writes
    one token shard per documents shard), so each needed documents shard is read once, only its hit rows
    kept."""
    tokens_ref = store.manifest(index_ref)["inputs"]["tokens"]
    documents_ref = store.manifest(tokens_ref)["inputs"]["documents"]
    groups = sorted(store.read_table(index_ref).to_pylist(), key=lambda g: g["group"])
    rows = {m["shard"]: m["rows"] for m in store.markers(tokens_ref)}  # shard sizes without reading shards
    located, start = {}, 0
    for shard in (s for g in groups for s in g["token_shards"]):
        inside = [ix for ix in doc_ixs if start <= ix < start + rows[shard]]
        if inside:
            table = store.read_shard(documents_ref, shard, columns=["id", "file", "line", "text"])
            located |= dict(zip(inside, table.take([ix - start for ix in inside]).to_pylist()))
        start += rows[shard]
    return located


def snippet(document: str, text: str, context: int) -> str:
    """The phrase with `context` characters either side (the document's start if the text differs)."""
    at = document.find(text)
    if at < 0:
        return document[: 2 * context] + ("…" if len(document) > 2 * context else "")
    lo, hi = max(0, at - context), min(len(document), at + len(text) + context)
    return ("…" if lo else "") + document[lo:hi] + ("…" if hi < len(document) else "")
