"""Near-duplicate documents: MinHash over shingles, LSH banding, candidates verified by their true Jaccard,
clusters by union-find; the shard-level passes ingest maps on Dask.

As in DataTrove's and NeMo Curator's fuzzy dedup: every document's shingles (word n-grams of the lower-cased
words, or character n-grams of them joined by single spaces) get a MinHash signature (`datasketch`:
`MinHash.generator` reuses one set of permutations for a whole shard, and its `MinHashLSH` picks bands x rows
for the threshold); a band of a signature is hashed to one 64-bit key, and two documents sharing a key in a
band are a candidate pair. Each candidate is verified by the true Jaccard of the two shingle sets (the
MinHash estimate only proposes), pairs at or above the threshold are edges, and each connected component
(union-find) keeps its first document in (shard, row) order, i.e. (file, line) order: the result does not
depend on scheduling.

Memory per task is bounded like exact dedup: signatures are written per parsed shard, partitioned by
bucket of their band key (one Parquet row group per bucket); a candidate task reads one group of buckets of
every shard; a verification task holds its shard's and one partner shard's texts (as Arrow columns) and
one run of pairs' shingle sets. The flow process holds only candidate pairs and edges.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.text import jaccard, words

SIGNATURE_SCHEMA = pa.schema([("bucket", pa.uint16()), ("band", pa.uint16()), ("key", pa.uint64()),
                              ("shard", pa.int32()), ("row", pa.int64())])
PAIR_SCHEMA = pa.schema([("shard_a", pa.int32()), ("row_a", pa.int64()), ("shard_b", pa.int32()),
                         ("row_b", pa.int64())])
EDGE_SCHEMA = pa.schema([("shard_a", pa.int32()), ("row_a", pa.int64()), ("id_a", pa.string()),
                         ("shard_b", pa.int32()), ("row_b", pa.int64()), ("id_b", pa.string()),
                         ("jaccard", pa.float64())])
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def band_shape(threshold: float, num_perm: int, bands: int | None) -> tuple[int, int]:
    """(bands, rows per band): `bands` as given, else datasketch's optimum for the threshold weighted 0.05 /
    0.95 against a missed pair (a false candidate costs one verification, a missed one a kept copy)."""
    if bands:
        return bands, num_perm // bands
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
    return lsh.b, lsh.r


def shingles(text: str, kind: str, size: int) -> set[str]:
    """The document's shingle set: word or character n-grams of its lower-cased words (a text shorter than
    one shingle is one shingle, so two short texts still compare)."""
    tokens = words(text)
    if kind == "chars":
        joined = " ".join(tokens)
        return {joined[i:i + size] for i in range(max(len(joined) - size + 1, 1))}
    return {" ".join(tokens[i:i + size]) for i in range(max(len(tokens) - size + 1, 1))}


def signatures(texts: Iterable[str], kind: str, size: int, num_perm: int, seed: int) -> np.ndarray:
    """[documents, num_perm] MinHash values (datasketch), one set of permutations for every text."""
    from datasketch import MinHash

    sets = ([s.encode() for s in shingles(t, kind, size)] for t in texts)
    values = [m.hashvalues for m in MinHash.generator(sets, num_perm=num_perm, seed=seed)]
    return np.stack(values).astype(np.uint64) if values else np.zeros((0, num_perm), np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of a combined band over the whole 64-bit key."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[documents, bands] 64-bit keys, one per band of `rows` signature values (equal bands, equal keys; a
    collision of unequal ones only adds a candidate, which verification rejects)."""
    keys = np.zeros((sig.shape[0], bands), np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            keys = _mix(keys * GOLDEN + sig[:, j:bands * rows:rows][:, :bands])
    return keys


def signature_shard(store_uri: str, ref: str, shard: int, item: tuple, params: dict) -> dict:
    """One parsed shard's band keys (rows exact dedup drops are left out), one row group per bucket."""
    store = ArtifactStore(store_uri)
    parsed_ref, dropped = item
    texts = store.read_shard(parsed_ref, shard, columns=["text"]).column(0).to_pylist()
    skip = set(dropped)
    rows = np.array([r for r in range(len(texts)) if r not in skip], np.int64)
    sig = signatures((texts[r] for r in rows), params["shingle"], params["shingle_size"],
                     params["num_perm"], params["seed"])
    keys = band_keys(sig, params["bands"], params["rows"])
    band = np.tile(np.arange(params["bands"], dtype=np.uint16), len(rows))
    flat = keys.reshape(-1)
    bucket = ((flat ^ band.astype(np.uint64)) % np.uint64(params["buckets"])).astype(np.uint16)
    order = np.argsort(bucket, kind="stable")
    table = pa.table({"bucket": bucket[order], "band": band[order], "key": flat[order],
                      "shard": np.full(len(flat), shard, np.int32),
                      "row": np.repeat(rows, params["bands"])[order]}, schema=SIGNATURE_SCHEMA)
    return store.write_shard(ref, shard, table, row_groups_by="bucket", documents=len(rows))


def group_pairs(members: list[tuple[int, int]], max_group: int) -> Iterable[tuple[int, int, int, int]]:
    """Candidate pairs of one LSH bucket's members (sorted): every pair up to `max_group` members, beyond
    that each member with the first two only (a template page shared by thousands stays linear, and the
    union-find still joins them through the first)."""
    heads = members if len(members) <= max_group else members[:2]
    for i, a in enumerate(heads):
        for b in members[i + 1:]:
            yield (*a, *b)


def candidate_group(store_uri: str, ref: str, group: int, item: tuple, max_group: int) -> dict:
    """Candidate pairs (first, later in (shard, row) order) of one group of buckets across every shard."""
    store = ArtifactStore(store_uri)
    sig_ref, n_shards, (first, last) = item
    table = pa.concat_tables([store.read_shard_rows(sig_ref, s, "bucket", first, last)
                              for s in range(n_shards)])
    cols = {c: table.column(c).to_numpy() for c in ("band", "key", "shard", "row")}
    order = np.lexsort((cols["row"], cols["shard"], cols["key"], cols["band"]))
    band, key = cols["band"][order], cols["key"][order]
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1]), True])
    pairs: set[tuple[int, int, int, int]] = set()
    for lo, hi in zip(starts[:-1], starts[1:]):
        if hi - lo > 1:
            members = list(zip(cols["shard"][order[lo:hi]].tolist(), cols["row"][order[lo:hi]].tolist()))
            pairs.update(group_pairs(members, max_group))
    out = pa.Table.from_pylist([dict(zip(PAIR_SCHEMA.names, p)) for p in sorted(pairs)], schema=PAIR_SCHEMA)
    return store.write_shard(ref, group, out)


def pair_chunks(pairs: list[tuple[int, int, int, int]], max_pairs: int) -> Iterable[list[tuple]]:
    """The pairs in runs of one partner shard and at most `max_pairs` each, so a verification task holds
    the shingle sets of one run only, however many candidates its shard has."""
    by_partner: dict[int, list[tuple]] = {}
    for pair in pairs:
        by_partner.setdefault(pair[2], []).append(pair)
    for partner in sorted(by_partner):
        run = by_partner[partner]
        for lo in range(0, len(run), max_pairs):
            yield run[lo:lo + max_pairs]


def _documents(table: pa.Table, rows: set[int], params: dict) -> dict[int, tuple[str, set[str]]]:
    """row -> (id, shingle set) of the wanted rows only (the rest of the shard stays in Arrow)."""
    wanted = sorted(rows)
    part = table.take(wanted)
    ids, texts = part.column("id").to_pylist(), part.column("text").to_pylist()
    return {r: (doc_id, shingles(text, params["shingle"], params["shingle_size"]))
            for r, doc_id, text in zip(wanted, ids, texts)}


def verify_shard(store_uri: str, ref: str, shard: int, item: tuple, params: dict) -> dict:
    """The true Jaccard of every candidate pair whose first document is in this shard: partners are read a
    shard at a time and pairs verified in runs of `verify_pairs` (`pair_chunks`), so memory is one shard's
    and one partner shard's Arrow columns plus one run's shingle sets."""
    store = ArtifactStore(store_uri)
    parsed_ref, pairs = item
    own = store.read_shard(parsed_ref, shard, columns=["id", "text"]) if pairs else None
    partner_shard, partner, out = None, None, []
    for chunk in pair_chunks(pairs, params["verify_pairs"]):
        if chunk[0][2] != partner_shard:
            partner_shard = chunk[0][2]
            partner = own if partner_shard == shard else store.read_shard(parsed_ref, partner_shard,
                                                                          columns=["id", "text"])
        a = _documents(own, {p[1] for p in chunk}, params)
        b = _documents(partner, {p[3] for p in chunk}, params)
        out += [{"shard_a": sa, "row_a": ra, "id_a": a[ra][0], "shard_b": sb, "row_b": rb, "id_b": b[rb][0],
                 "jaccard": jaccard(a[ra][1], b[rb][1])} for sa, ra, sb, rb in chunk]
    return store.write_shard(ref, shard, pa.Table.from_pylist(out, schema=EDGE_SCHEMA))


def clusters(edges: Iterable[tuple[tuple[int, int], tuple[int, int], float]]) -> dict[tuple, tuple]:
    """member -> (kept document, highest Jaccard of the member's edges) for every document joined to an
    earlier one; the kept document of a component is its first in (shard, row) order."""
    parent: dict[tuple, tuple] = {}

    def root(x: tuple) -> tuple:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    best: dict[tuple, float] = {}
    for a, b, sim in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        for x in (a, b):
            best[x] = max(best.get(x, 0.0), sim)
    return {x: (root(x), best[x]) for x in best if root(x) != x}
