"""Model outputs traced back to the corpus, as OLMoTrace does: the maximal spans of a text that occur in the
indexed corpus, their documents, and the share of the text's tokens that such spans cover.

A library module (the CLI's `tracecore trace text` and the eval stage both call it; stages never import
each other). On a u16 index the engine's `creativity()` gives, for every token position i, the end r_i of the
longest span starting at i that occurs; on a paired (u32) index, where that call would work in index symbols,
r_i comes from counts (the two-pointer walk: occurrence is closed under sub-spans, so r_i never decreases).
The maximal spans (not inside the span of an earlier start) of at least `min_span` tokens occurring at most
`max_count` times are read off r_i with one count each: the set the engine's `attribute()` returns.
Coverage is the creativity measure's complement (Lu et al., 2024): the share of tokens inside some
occurring span of at least `min_span` tokens, whatever its count.
"""

from __future__ import annotations

from tracecore.storage.store import ArtifactStore
from tracecore.tasks.index_query import docs_by_ranks, document_rows, phrase_ranks, raw_engine, snippet
from tracecore.tasks.ngram_engine import PairedEngine


def reach(engine, ids: list[int]) -> list[int]:
    """r_i for every position: `ids[i:r_i]` is the longest span starting at i that the corpus holds."""
    if not isinstance(engine, PairedEngine):
        return list(engine.creativity(ids)["rs"]) if ids else []
    ends, end = [], 0
    for start in range(len(ids)):
        end = max(end, start)
        while end < len(ids) and engine.count(ids[start:end + 1])["count"] > 0:
            end += 1
        ends.append(end)
    return ends


def coverage(ends: list[int], min_span: int) -> float:
    """The share of positions inside some [i, r_i) of at least `min_span` tokens (0 for an empty text)."""
    covered, frontier = 0, 0
    for start, end in enumerate(ends):
        if end - start >= min_span:
            covered += max(0, end - max(frontier, start))
            frontier = max(frontier, end)
    return covered / len(ends) if ends else 0.0


def maximal_spans(engine, ids: list[int], min_span: int, max_count: int,
                  ends: list[int] | None = None) -> list[dict]:
    """`{"l", "r", "count"}` of every maximal occurring span of >= `min_span` tokens seen <= `max_count`
    times, in order: what the engine's `attribute()` returns (tested equal), from the reach `ends` plus one
    count per maximal span, since `attribute()` walks the suffix arrays again and took longer than
    `creativity()` itself on a large index."""
    spans, previous = [], 0
    for start, end in enumerate(reach(engine, ids) if ends is None else ends):
        if end > previous and end - start >= min_span:
            count = engine.count(ids[start:end])["count"]
            if count <= max_count:
                spans.append({"l": start, "r": end, "count": count})
        previous = max(previous, end)
    return spans


def trace_output(store: ArtifactStore, index_ref: str, engine, tok, text: str, min_span: int, max_count: int,
                 max_docs: int, ids: list[int] | None = None) -> dict:
    """One text's trace: its token count, coverage and maximal spans, each with up to `max_docs` documents
    (id, file, line and a snippet around the span); `ids`: the text's own token ids (a generation's), else
    it is tokenized as running text (leading space)."""
    ids = list(ids) if ids is not None else tok.encode(" " + text.strip(), add_special_tokens=False).ids
    ends = reach(engine, ids)
    spans = maximal_spans(engine, ids, min_span, max_count, ends)
    raw, _ = raw_engine(engine)
    ranks = [phrase_ranks(engine, ids[s["l"]:s["r"]], 4 * max_docs)[1] for s in spans]
    hits = docs_by_ranks(raw, [r for rs in ranks for r in rs])
    per_span, offset = [], 0
    for rs in ranks:
        per_span.append(list(dict.fromkeys(h["doc_ix"] for h in hits[offset:offset + len(rs)]))[:max_docs])
        offset += len(rs)
    located = document_rows(store, index_ref, sorted({ix for ixs in per_span for ix in ixs}))
    out = []
    for span, ixs in zip(spans, per_span):
        span_text = tok.decode(ids[span["l"]:span["r"]]).strip()
        out.append({**span, "tokens": span["r"] - span["l"], "text": span_text, "documents": [
            {k: located[ix][k] for k in ("id", "file", "line")} | {"snippet": snippet(located[ix]["text"],
                                                                                        span_text, 60)}
            for ix in ixs]})
    return {"text": text, "tokens": len(ids), "covered": round(coverage(ends, min_span), 6),
            "min_span": min_span, "max_span_count": max_count, "spans": out}
