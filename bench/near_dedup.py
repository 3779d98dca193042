"""Benchmark: near-duplicate removal in ingest against planted near-copies, and against a single-process
datasketch loop on the same corpus.

    .venv/bin/python bench/near_dedup.py [--sizes 1e6 1e7] [--copy-share 0.1] [--work DIR]

Corpus: `bench/scale.py`'s generated documents (Zipf words, 120-360 words each, all distinct) in gzip JSONL
files of `--file-tokens` tokens, plus near-copies of a `--copy-share` of them, each with a known share of its
words substituted (the edit rates in `EDIT_RATES`, in turn) and appended to the file after its source's, so
each copy's true Jaccard to its source (word 5-shingles, as ingest counts it) is known (the ground truth is
every copy at >= 0.8) and every shard has about the same size at every corpus size.

Ours: the `ingest` stage with `ingest.near_dedup` on a fresh 2-worker LocalCluster (as a run starts one), and
the same stage without it on the same files; near-dedup's cost is the difference. Peak RSS of the largest Dask
worker is sampled every 0.1 s, per pass of the stage. Peer: what a user writes with datasketch in one
process: a MinHash per document (`MinHash.bulk` over the same shingles, same permutations), a `MinHashLSH` at
the same threshold and num_perm, a query per document, candidates verified by true Jaccard, first occurrence
kept. Both are measured in this process, one after the other, with the machine's calibration printed first.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
EDIT_RATES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)  # word substitutions per copy: J from ~0.97 to ~0.3


def planted_copies(texts: list[str], share: float, seed: int) -> tuple[list[str], list[dict]]:
    """Near-copies of `share` of the texts at the edit rates in turn, with each one's true Jaccard."""
    from tracecore.tasks.near_dedup import shingles
    from tracecore.tasks.text import jaccard

    rng = random.Random(seed)
    copies, truth = [], []
    for k, i in enumerate(rng.sample(range(len(texts)), int(share * len(texts)))):
        words = texts[i].split(" ")
        rate = EDIT_RATES[k % len(EDIT_RATES)]
        for j in rng.sample(range(len(words)), max(1, round(rate * len(words)))):
            words[j] = rng.choice([w for w in words[:50] if w != words[j]])  # a real change: no exact copy
        copy = " ".join(words)
        copies.append(copy)
        truth.append({"source": i, "rate": rate,
                      "jaccard": jaccard(shingles(copy, "words", 5), shingles(texts[i], "words", 5))})
    return copies, truth


def corpus(folder: Path, tokens: float, file_tokens: int, share: float, seed: int) -> tuple[list[str], dict]:
    """The files and the ground truth keyed by the copies' ids. Each copy is appended to the file after its
    source's (the last file's own copies to itself), so it follows its source in (file, line) order, most
    pairs span two shards, and every file has about the same size at every corpus size: the largest shard,
    and with it the memory a task may hold, does not grow with the corpus."""
    import gzip

    from scale import documents, lexicon

    rng = np.random.default_rng(seed)
    words, weights = lexicon(rng)
    per_doc = 1.3 * 240  # BPE tokens per ~240-word document, about
    texts = documents(rng, words, weights, max(1, int(tokens / per_doc)))
    folder.mkdir(parents=True, exist_ok=True)
    per_file = max(1, int(file_tokens / per_doc))
    n_files = -(-len(texts) // per_file)
    rows: list[list[tuple[str, str]]] = [[(f"f{i // per_file}-{i % per_file}", t) for i, t in
                                          enumerate(texts[f * per_file:(f + 1) * per_file], f * per_file)]
                                         for f in range(n_files)]
    copies, truth = planted_copies(texts, share, seed)
    keyed = {}
    for k, (copy, t) in enumerate(zip(copies, truth)):
        source_file = t["source"] // per_file
        rows[min(source_file + 1, n_files - 1)].append((f"copy-{k}", copy))
        keyed[f"copy-{k}"] = {**t, "source_id": f"f{source_file}-{t['source'] % per_file}"}
    paths = []
    for f, file_rows in enumerate(rows):
        path = folder / f"part-{f:05d}.jsonl.gz"
        with gzip.open(path, "wt", compresslevel=1) as fh:  # [a-z .] texts: no escaping needed
            fh.writelines(f'{{"id": "{i}", "text": "{t}"}}\n' for i, t in file_rows)
        paths.append(str(path))
    return paths, keyed


def worker_peak(stop: threading.Event, peak: dict[str, float], current: list[str]) -> None:
    """The largest RSS (MiB) of any child process of this one (the Dask workers) until `stop`, per pass
    (`current[0]`: the output the stage is mapping, set by `ours`)."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                rss = child.memory_info().rss / 2**20
            except psutil.Error:
                continue
            peak[current[0]] = max(peak.get(current[0], 0.0), rss)
        stop.wait(0.1)


def ours(paths: list[str], store: str, near: bool) -> tuple[float, dict[str, float], list[dict]]:
    """(ingest seconds, largest worker MiB per pass, removed rows) on a fresh 2-worker LocalCluster."""
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.plan import plan_pipeline
    from tracecore.flows.runtime import dask_cluster
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.runtime.registry import stages_of, validate_config
    from tracecore.tasks.runtime.stage import StageRun, run_stage

    cfg = validate_config({"store": store, "calibrate": False,
                           "ingest": {"paths": paths, "near_dedup": {"enabled": near}}})
    plan = plan_pipeline(cfg, ArtifactStore(store), ["ingest"])["ingest"]
    current, mapping = ["start"], StageRun.map

    def labelled(run, name, *args, **kwargs):  # which pass the sampled peak belongs to
        current[0] = name
        try:
            return mapping(run, name, *args, **kwargs)
        finally:
            current[0] = "between passes"

    StageRun.map = labelled
    try:
        with dask_cluster(DaskConfig(n_workers=2, threads_per_worker=1)) as address:
            stop, peak = threading.Event(), {}
            sampler = threading.Thread(target=worker_peak, args=(stop, peak, current), daemon=True)
            sampler.start()
            start = time.perf_counter()
            run_stage(stages_of(cfg)["ingest"], cfg.ingest, plan, store, address)
            seconds = time.perf_counter() - start
            stop.set()
            sampler.join()
    finally:  # the next size's plain run must not be labelled by this one
        StageRun.map = mapping
    removed = ArtifactStore(store).read_table(plan.refs["near_duplicates"]).to_pylist() if near else []
    return seconds, peak, removed


def peer(paths: list[str], threshold: float, num_perm: int) -> tuple[float, set[str]]:
    """A single-process datasketch loop over the same documents: (seconds, ids removed)."""
    import gzip

    from datasketch import MinHash, MinHashLSH
    from tracecore.tasks.near_dedup import band_shape, shingles
    from tracecore.tasks.text import jaccard

    start = time.perf_counter()
    docs = [json.loads(line) for p in paths for line in gzip.open(p, "rt")]
    sets = [shingles(d["text"], "words", 5) for d in docs]
    bands, rows = band_shape(threshold, num_perm, None)
    lsh, removed = MinHashLSH(num_perm=num_perm, params=(bands, rows)), set()
    signatures = MinHash.generator(([x.encode() for x in s] for s in sets), num_perm=num_perm, seed=1)
    for k, (doc, s, m) in enumerate(zip(docs, sets, signatures)):
        if any(jaccard(s, sets[j]) >= threshold for j in lsh.query(m)):
            removed.add(doc["id"])  # a near-copy of a document kept before it
        else:
            lsh.insert(k, m)
    return time.perf_counter() - start, removed


def scores(removed: set[str], truth: dict[str, dict], threshold: float) -> tuple[float, float]:
    """(precision, recall) of the removed ids against the copies at Jaccard >= threshold."""
    positive = {k for k, t in truth.items() if t["jaccard"] >= threshold}
    hits = len(removed & positive)
    return hits / max(len(removed), 1), hits / max(len(positive), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--copy-share", type=float, default=0.1)
    parser.add_argument("--file-tokens", type=int, default=1_000_000)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    from tracecore.flows.calibrate import calibrate, calibration_line

    print(calibration_line(calibrate()), flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="near-dedup-bench-"))
    print("| corpus tokens | documents | shards | copies at J >= 0.8 | ours: precision / recall | peer: "
          "precision / recall | near-dedup s, ours (2 workers) | peer s (1 process) | peer / ours | largest "
          "worker MiB, ingest without / with near-dedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    passes = {}
    for size in args.sizes:
        paths, truth = corpus(work / f"corpus-{size:.0e}", size, args.file_tokens, args.copy_share, 0)
        base, base_peak, _ = ours(paths, str(work / f"store-plain-{size:.0e}"), near=False)
        total, peak, removed = ours(paths, str(work / f"store-near-{size:.0e}"), near=True)
        passes[size] = peak
        peer_s, peer_removed = peer(paths, 0.8, 128)
        p, r = scores({row["id"] for row in removed}, truth, 0.8)
        pp, pr = scores(peer_removed, truth, 0.8)
        near_s = total - base
        n_docs = round(len(truth) / args.copy_share) + len(truth)
        positives = sum(t["jaccard"] >= 0.8 for t in truth.values())
        print(f"| {size:.0e} | {n_docs:,.0f} | {len(paths)} | {positives} | {p:.3f} / {r:.3f} | {pp:.3f} / "
              f"{pr:.3f} | {near_s:.1f} | {peer_s:.1f} | {peer_s / max(near_s, 1e-9):.2f} | "
              f"{max(base_peak.values()):.0f} / {max(peak.values()):.0f} |", flush=True)
    names = list(dict.fromkeys(n for peak in passes.values() for n in peak))
    print("\nLargest worker MiB per pass of ingest with near-dedup:\n")
    print("| corpus tokens | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for size, peak in passes.items():
        print(f"| {size:.0e} | " + " | ".join(f"{peak[n]:.0f}" if n in peak else "" for n in names) + " |")

if __name__ == "__main__":
    main()
