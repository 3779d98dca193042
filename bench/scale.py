"""Benchmark: the n-gram pipeline (ingest -> tokenize -> ngram) at 10^6, 10^7, 10^8 tokens and on one large
file; wall time and peak RSS per stage and per process, and throughput against the raw peers on the same data.

    .venv/bin/python bench/scale.py [--sizes 1e6 1e7 1e8] [--big-file-gb 2] [--repeats 5 --repeat-below 1e6]
    [--work DIR]

Corpus: generated text (pseudo-words drawn Zipf-like from a 50 k-word vocabulary, sentences of ~12 words,
120-360 words per document, every document distinct), gzip JSONL files of `--file-tokens` tokens each (real
corpora ship as fixed-size shards), plus one plain JSONL file of `--big-file-gb` GB (split by byte ranges into
`--shard-mb` shards). One 32,000-token BPE trained on 20 k documents serves every run.

Every measured run is its own process (ours: a 2-worker LocalCluster started inside it as a run starts its
own, `flows.runtime.dask_cluster` with the default `dask` config section, cluster start-up and the stage
module's import on the workers shown apart, as the peers' imports are not timed; a fresh cluster per stage so
each stage's worker peak is its own; every stage planned once before any runs, as a pipeline run does, the
planning shown apart: the tenth and earlier runs re-planned each stage and its upstream inside the stage's
window); this process polls the RSS of that process tree every 0.1 s. Roles: `main` (the flow process, with
the scheduler), `worker` (the largest Dask worker), `indexer` (infini-gram's indexer, a child of a worker),
`sum` (peak of the sum over all processes).

Peers, each on the same data in one process using both cores where the library can; the tokenizing peers load
the tokenizer inside their clock, as ours does in every task (the tenth and earlier runs in RESULTS.md left it
out; the report gives the ratio both ways):
- e2e: read the input files, parse, validate, exact-dedup (one set), `tokenizers` `encode_batch`, write
Parquet;
- tokenize: our committed documents shards -> `encode_batch` (rayon, all cores) -> Parquet;
- index: infini-gram's own indexer as a user runs it (`python -m infini_gram.indexing`, --cpus = cores) on the
  whole corpus's tokenized.0/offset.0 (writing those files is timed apart and not counted); ours runs the same
  package's `rust_indexing` binary steps without that Python driver (`tasks.ngram.build_suffix_array`);
- numpy n-gram: every n-gram (n = 1..max_n) packed into uint64 and counted with `np.unique`, one process whose
  address space is capped at the machine's memory, so running out of memory is a MemoryError, not the OOM
  killer.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("ingest", "tokenize", "ngram")
VOCAB = 32_000


# ---- corpus -----------------------------------------------------------------------------------
def lexicon(rng: np.random.Generator, n: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """(words, Zipf weights): words of 1-4 syllables, sentence-final variants ("word.") after them."""
    syllables = np.array([c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")])
    lengths = rng.integers(1, 5, n)
    words = sorted({"".join(rng.choice(syllables, k)) for k in lengths})
    rng.shuffle(words)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    return np.array(words + [w + "." for w in words], dtype=object), weights / weights.sum()


def documents(rng: np.random.Generator, words: np.ndarray, weights: np.ndarray, n_docs: int) -> list[str]:
    """n_docs distinct texts; every ~12th word ends a sentence."""
    lengths = rng.integers(120, 361, n_docs)
    idx = rng.choice(len(weights), size=int(lengths.sum()), p=weights)
    idx[rng.random(idx.size) < 1 / 12] += len(weights)
    picked, out, at = words[idx], [], 0
    for length in lengths:
        out.append(" ".join(picked[at:at + length]))
        at += length
    return out


def write_jsonl(path: Path, texts: list[str], prefix: str, compress: bool) -> int:
    """JSONL by hand: the texts are [a-z .] only, so no escaping is needed (json.dumps would dominate)."""
    with gzip.open(path, "wt", compresslevel=1) if compress else open(path, "w") as fh:
        fh.writelines(f'{{"id": "{prefix}-{i}", "text": "{t}"}}\n' for i, t in enumerate(texts))
    return path.stat().st_size


def make_tokenizer(work: Path, rng: np.random.Generator, words, weights) -> tuple[Path, float]:
    """Train the BPE once; returns its folder and the measured tokens per document."""
    from tokenizers import Tokenizer
    from tracecore.tasks.tokenize import train_bpe

    folder = work / "tokenizer"
    texts = documents(rng, words, weights, 20_000)
    if not (folder / "tokenizer.json").exists():
        train_bpe(texts, VOCAB, 2, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    per_doc = np.mean([len(e.ids) for e in tok.encode_batch(texts[:2000], add_special_tokens=False)])
    return folder, float(per_doc)


def make_corpus(folder: Path, tokens: int, file_tokens: int, tokens_per_doc: float, seed: int, words, weights,
                big_gb: float = 0.0) -> list[str]:
    """gzip JSONL files of ~file_tokens tokens each, or (big_gb > 0) one plain JSONL file of big_gb GB."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if big_gb:
        path, size, part = folder / "corpus.jsonl", 0, 0
        with open(path, "w") as fh:
            while size < big_gb * 1e9:
                texts = documents(rng, words, weights, 20_000)
                fh.writelines(f'{{"id": "big-{part}-{i}", "text": "{t}"}}\n' for i, t in enumerate(texts))
                size, part = fh.tell(), part + 1
        return [str(path)]
    paths, left, k = [], tokens, 0
    while left > 0:
        n_docs = max(1, round(min(left, file_tokens) / tokens_per_doc))
        path = folder / f"part-{k:05d}.jsonl.gz"
        write_jsonl(path, documents(rng, words, weights, n_docs), f"{seed}-{k}", compress=True)
        paths.append(str(path))
        left, k = left - file_tokens, k + 1
    return paths


# ---- RSS sampling -----------------------------------------------------------------------------
def role(proc, root_pid: int) -> str:
    cmd = " ".join(proc.cmdline())
    if proc.pid == root_pid:
        return "main"
    if "infini_gram" in cmd or "rust_indexing" in cmd:
        return "indexer"
    if "multiprocessing" in cmd and ("spawn_main" in cmd or "forkserver" in cmd):
        return "worker"
    return "other"


def sample_tree(proc, stop: threading.Event, samples: list, period: float = 0.1) -> None:
    """Append (time, role, pid, rss) for every live process of the tree until `stop`."""
    import psutil

    while not stop.is_set():
        now, total = time.time(), 0
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss = p.memory_info().rss
                    samples.append((now, role(p, proc.pid), p.pid, rss))
                    total += rss
        samples.append((now, "sum", 0, total))
        stop.wait(period)


def measured(cmd: list[str], timeout: float = 7200) -> tuple[dict, list]:
    """Run a child that prints one JSON line last; returns (its result, RSS samples of its tree)."""
    import psutil

    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list = []
    stop = threading.Event()
    thread = threading.Thread(target=sample_tree, args=(psutil.Process(child.pid), stop, samples),
                              daemon=True)
    thread.start()
    out, err = child.communicate(timeout=timeout)
    stop.set()
    thread.join()
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if child.returncode != 0 or not lines:
        return {"error": (err or out)[-1500:], "returncode": child.returncode}, samples
    return json.loads(lines[-1]), samples


def peaks(samples: list, start: float = 0.0, end: float = float("inf")) -> dict[str, float]:
    """Peak RSS in MiB per role within [start, end] (the largest single process of that role)."""
    out: dict[str, float] = {}
    for t, name, _, rss in samples:
        if start <= t <= end:
            out[name] = max(out.get(name, 0.0), rss / 2**20)
    return out


def new_valid_texts(lines, cfg, seen: set) -> Iterator[str]:
    """The naive ingest a peer loop runs: parse, validate, drop exact duplicates with one in-memory hash
    set."""
    import hashlib

    from tracecore.tasks.ingest import validate_record

    for line in lines:
        obj = json.loads(line)
        if validate_record(obj, cfg) is None:
            digest = hashlib.sha256(obj["text"].encode()).digest()
            if digest not in seen:
                seen.add(digest)
                yield obj["text"]


# ---- our pipeline, in its own process ---------------------------------------------------------
def ours(args) -> dict:
    """ingest, tokenize, ngram one after another on a fresh 2-worker LocalCluster each; planned once first, as
    a pipeline run plans every stage before any works (`flows.pipeline.run_graph`); stage windows in wall
    time."""
    import tracecore.flows.pipeline  # noqa: F401 (a run's flow process has Prefect imported before any stage)
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.plan import pipeline_refs, plan_pipeline
    from tracecore.flows.runtime import dask_cluster
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.runtime.registry import stages_of, validate_config
    from tracecore.tasks.runtime.stage import run_stage

    cfg = validate_config({"store": args.store, "ingest": {"paths": args.paths, "shard_mb": args.shard_mb},
                           "tokenize": {"tokenizer_path": args.tokenizer}, "ngram": {"index_mem_gib": 2}})
    store, start = ArtifactStore(cfg.store), time.perf_counter()
    plans = plan_pipeline(cfg, store, list(STAGES))
    result = {"stages": {}, "plan_seconds": round(time.perf_counter() - start, 3)}
    for stage in STAGES:  # a fresh cluster per stage: each stage's worker peak is its own (`client.restart()`
        start = time.perf_counter()  # instead hung at times here: the nannies never respawned their workers)
        # as a run's own
        with dask_cluster(DaskConfig(n_workers=args.workers, threads_per_worker=1)) as address:
            warm_workers(address, stage)
            result.setdefault("cluster_start_s", round(time.perf_counter() - start, 2))
            t0 = time.time()
            run_stage(stages_of(cfg)[stage], getattr(cfg, stage), plans[stage], store.uri, address)
            result["stages"][stage] = {"start": t0, "end": time.time(), "seconds": round(time.time() - t0, 2)}
    refs = pipeline_refs(plans)
    tokens = store.manifest(refs["tokenize.tokens"])
    result.update(tokens=tokens["tokens"], documents_ref=refs["ingest.documents"],
                  tokens_ref=refs["tokenize.tokens"],
                  index_seconds=store.manifest(refs["ngram.index"])["seconds"],
                  table_seconds=store.manifest(refs["ngram.counts"])["seconds"],
                  shards=store.manifest(refs["tokenize.tokens"])["shards"])
    return result


def warm_workers(address: str, stage: str) -> None:
    """Import the stage's module on every worker before the clock starts, and pandas (`warm_pyarrow`): the
    peers' imports are not timed either, and in a pipeline run the workers serve every stage (imported
    once)."""
    import importlib

    from distributed import Client

    with Client(address) as client:
        client.run(importlib.import_module, f"tracecore.tasks.{stage}")
        client.run(warm_pyarrow)


def warm_pyarrow() -> None:
    """pyarrow imports pandas on its first `pa.array` of a process (0.3 s here, measured: ours paid it once
    per stage and worker, on a fresh cluster per stage, and each peer once, inside their clocks); every
    measured
    process does it before its clock, as a run's warm workers have."""
    import pyarrow as pa

    pa.array([0])


# ---- peers, each in its own process -----------------------------------------------------------
def peer_e2e(args) -> dict:
    """What a user would write first: stream each file, parse, validate, dedup, encode (all cores), write."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer
    from tracecore.configs.schema import IngestConfig

    start = time.perf_counter()
    tok, cfg = Tokenizer.from_file(f"{args.tokenizer}/tokenizer.json"), IngestConfig()
    seen, total, part = set(), 0, 0
    load = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def flush(texts: list[str]) -> int:
        nonlocal part
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        pq.write_table(pa.table({"tokens": pa.array(ids, type=pa.list_(pa.uint16()))}),
                       out / f"{part}.parquet")
        part += 1
        return sum(map(len, ids))

    for path in args.paths:
        texts: list[str] = []
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
            for text in new_valid_texts(fh, cfg, seen):
                texts.append(text)
                if len(texts) >= 50_000:
                    total, texts = total + flush(texts), []
        if texts:
            total += flush(texts)
    return {"seconds": time.perf_counter() - start, "load_seconds": load, "tokens": total}


def peer_tokenize(args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer
    from tracecore.storage.store import ArtifactStore

    store, total, out = ArtifactStore(args.store), 0, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tok = Tokenizer.from_file(f"{args.tokenizer}/tokenizer.json")
    load = time.perf_counter() - start
    for m in store.markers(args.ref):
        texts = store.read_shard(args.ref, m["shard"], columns=["text"], verify=False).column(0).to_pylist()
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        pq.write_table(pa.table({"tokens": pa.array(ids, type=pa.list_(pa.uint16()))}),
                       out / f"{m['shard']}.parquet")
        total += sum(map(len, ids))
    return {"seconds": time.perf_counter() - start, "load_seconds": load, "tokens": total}


def peer_index(args) -> dict:
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.ngram import run_package_indexer, write_infinigram_files

    store, folder = ArtifactStore(args.store), Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    shards = [m["shard"] for m in store.markers(args.ref)]
    start = time.perf_counter()
    _, tokens = write_infinigram_files(store, args.ref, shards, VOCAB, folder)
    prepare = time.perf_counter() - start
    start = time.perf_counter()
    run_package_indexer(folder, 2 * args.workers, args.workers)
    return {"seconds": time.perf_counter() - start, "prepare_seconds": prepare, "tokens": tokens}


def peer_numpy(args) -> dict:
    """pack + np.unique per n over the whole corpus in one process; address space capped at physical
    memory."""
    import psutil
    from tracecore.storage.store import ArtifactStore

    cap = psutil.virtual_memory().total
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    store = ArtifactStore(args.store)
    start = time.perf_counter()
    try:
        docs = [np.asarray(d, np.uint64) for m in store.markers(args.ref)
                for d in store.read_shard(args.ref, m["shard"], columns=["tokens"], verify=False)
                .column(0).to_numpy(zero_copy_only=False)] * args.repeat  # --repeat: where it runs out
        flat = np.concatenate(docs)
        doc_of = np.repeat(np.arange(len(docs), dtype=np.uint32), [len(d) for d in docs])
        del docs
        distinct = 0
        for n in range(1, args.max_n + 1):
            m = len(flat) - n + 1
            keys = flat[:m].copy()
            for k in range(1, n):
                keys |= flat[k:k + m] << np.uint64(16 * k)
            keys = keys[doc_of[:m] == doc_of[n - 1:n - 1 + m]]
            distinct += len(np.unique(keys, return_counts=True)[0])
            del keys
    except MemoryError:
        return {"seconds": time.perf_counter() - start, "oom": True, "cap_gib": round(cap / 2**30, 1),
                "tokens": int(store.manifest(args.ref)["tokens"]) * args.repeat}
    return {"seconds": time.perf_counter() - start, "tokens": len(flat), "distinct": distinct, "oom": False,
            "cap_gib": round(cap / 2**30, 1)}


CHILDREN = {"ours": ours, "peer-e2e": peer_e2e, "peer-tokenize": peer_tokenize, "peer-index": peer_index,
            "peer-numpy": peer_numpy}


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=sorted(CHILDREN))
    parser.add_argument("--paths", nargs="*", default=[])
    for flag in ("--store", "--tokenizer", "--out", "--ref"):
        parser.add_argument(flag)
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-n", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1,
                        help="peer-numpy: count the corpus this many times over")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRACECORE_NO_PROGRESS", "1")
    if args.what == "ours":
        # as the tracecore CLI sets it (tokenize turns it on per task)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warm_pyarrow()
    print(json.dumps(CHILDREN[args.what](args)))


# ---- the driver -------------------------------------------------------------------------------
def child(what: str, **flags) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", what]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}", *(value if isinstance(value, list) else [str(value)])]
    return cmd


def run_case(name: str, paths: list[str], case_dir: Path, tokenizer: Path, args) -> dict:
    """Ours, then each peer on the same data; every figure of one case comes from one run of this function."""
    store = case_dir / "store"
    subprocess.run(["rm", "-rf", str(store)], check=False)  # a repeat computes everything again
    result, samples = measured(child("ours", paths=paths, store=store, tokenizer=tokenizer,
                                     shard_mb=args.shard_mb, workers=args.workers))
    if "error" in result:
        raise SystemExit(f"{name}: our pipeline failed: {result['error']}")
    result["rss"] = {s: peaks(samples, w["start"], w["end"]) for s, w in result["stages"].items()}
    result["rss_all"] = peaks(samples)
    result["peers"] = {}
    peers = {"e2e": {"paths": paths, "tokenizer": tokenizer, "out": case_dir / "peer-e2e"},
             "tokenize": {"store": store, "tokenizer": tokenizer, "ref": result["documents_ref"],
                          "out": case_dir / "peer-tok"},
             "index": {"store": store, "ref": result["tokens_ref"], "out": case_dir / "peer-index",
                       "workers": args.workers},
             **{("numpy" if r == 1 else f"numpy x{r}"): {"store": store, "ref": result["tokens_ref"],
                                                         "repeat": r}
                for r in args.numpy_repeats}}
    for peer, flags in peers.items():
        if peer.split()[0] in args.skip_peers:
            continue
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the peers use every core the library can
        out, peer_samples = measured(child(f"peer-{peer.split()[0]}", **flags))
        out["rss"] = peaks(peer_samples)
        result["peers"][peer] = out
        subprocess.run(["rm", "-rf", str(flags.get("out", case_dir / "none"))], check=False)
    print(f"{name}: done ({result['tokens']:,} tokens)", file=sys.stderr, flush=True)
    return result


def median_run(runs: list[dict]) -> dict:
    """One result of `--repeats` runs of a case: the median of every time, the largest of every peak, and each
    ours/peer ratio's range over the runs (`ratio_range`). A shared machine moves single-run ratios by
    0.1-0.2."""
    def median(values):
        return float(np.median(values))

    first = runs[0]
    out = {**first, "repeats": len(runs), "index_seconds": median([r["index_seconds"] for r in runs]),
           "plan_seconds": median([r.get("plan_seconds", 0) for r in runs]),
           "table_seconds": median([r["table_seconds"] for r in runs]),
           "stages": {s: {**w, "seconds": median([r["stages"][s]["seconds"] for r in runs])}
                      for s, w in first["stages"].items()},
           "rss": {s: {k: max(r["rss"][s].get(k, 0) for r in runs) for k in first["rss"][s]}
                   for s in first["rss"]}}
    out["peers"] = {}
    for peer, result in first["peers"].items():
        done = [r["peers"][peer] for r in runs if "error" not in r["peers"][peer]
                and not r["peers"][peer].get("oom")]
        out["peers"][peer] = {**result,
                              **{k: median([d[k] for d in done]) for k in ("seconds", "load_seconds")
                                           if done and k in result},
                              "rss": {k: max(r["peers"][peer]["rss"].get(k, 0) for r in runs)
                                      for k in result["rss"]}}
    ratios = per_run_ratios(runs)
    out["ratio_range"] = {peer: (min(v), max(v)) for peer, v in ratios.items()}
    # pairs of one repeat, not of medians
    out["ratio_median"] = {peer: median(v) for peer, v in ratios.items()}
    out["runs"] = runs if len(runs) > 1 else []  # every repeat's own figures, for the --json file
    return out


def per_run_ratios(runs: list[dict]) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {}
    for r in runs:
        for peer, (_, ours_s) in compared_seconds(r).items():
            result = r["peers"].get(peer, {})
            if ("seconds" in result and "error" not in result and not result.get("oom")
                    and not peer.startswith("numpy x")):
                ratios.setdefault(peer, []).append(result["seconds"] / ours_s)
                if "load_seconds" in result:
                    ratios.setdefault(f"{peer} bare",
                                      []).append((result["seconds"] - result["load_seconds"]) / ours_s)
    return ratios


def compared_seconds(r: dict) -> dict[str, tuple[str, float]]:
    """peer -> (what is compared, our seconds for it)."""
    st = r["stages"]
    return {"e2e": ("ingest + tokenize vs e2e loop", st["ingest"]["seconds"] + st["tokenize"]["seconds"]),
            "tokenize": ("tokenize vs encode_batch", st["tokenize"]["seconds"]),
            "index": ("index vs infini-gram indexer", r["index_seconds"]),
            "numpy": ("exact table vs numpy unique", r["table_seconds"]),
            **{k: (f"exact table vs numpy unique, corpus counted {k.split('x')[1]} times", r["table_seconds"])
               for k in r["peers"] if k.startswith("numpy x")}}


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds / 1e6:.2f} M/s"


def report(results: dict[str, dict]) -> str:
    """Markdown: growth of time and RSS per stage, then ours vs the peers."""
    lines = [("| corpus | tokens | shards | stage | seconds | tokens/s | time vs linear | main MiB | worker "
              "MiB | indexer MiB | sum MiB |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    previous: dict | None = None
    for name, r in results.items():
        for stage, w in r["stages"].items():
            grow = "-"
            if previous and not name.startswith("single"):
                expected = (w["seconds"] / previous["stages"][stage]["seconds"]
                            / (r["tokens"] / previous["tokens"]))
                grow = f"{expected:.2f}x"
            rss = r["rss"][stage]
            lines.append(f"| {name} | {r['tokens']:,} | {r['shards']} | {stage} | {w['seconds']:.1f} | "
                         f"{rate(r['tokens'], w['seconds'])} | {grow} | {rss.get('main', 0):.0f} | "
                         f"{rss.get('worker', 0):.0f} | {rss.get('indexer', 0):.0f} | "
                         f"{rss.get('sum', 0):.0f} |")
        if "plan_seconds" in r:
            lines.append(f"| {name} | {r['tokens']:,} | {r['shards']} | plan (once per run) | "
                         f"{r['plan_seconds']:.2f} "
                         "| - | - | - | - | - | - |")
        if not name.startswith("single"):
            previous = r
    lines += ["", ("| corpus | what | ours (median) | peer (median) | ours / peer (repeats: median of each "
                   "repeat's ratio, range) | peer peak MiB |"),
              "|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r["peers"]
        for peer, (what, ours_s) in compared_seconds(r).items():
            if peer not in p:
                continue
            if "error" in p[peer] or p[peer].get("oom"):
                why = "out of memory" if p[peer].get("oom") else "failed"
                lines.append(f"| {name} | {what} | {rate(r['tokens'], ours_s)} | {why} | - | "
                             f"{p[peer]['rss'].get('sum', 0):.0f} |")
                continue
            if peer.startswith("numpy x"):
                lines.append(f"| {name} | {what} | - | {p[peer]['tokens'] / p[peer]['seconds'] / 1e6:.2f} "
                             f"M/s | - | "
                             f"{p[peer]['rss'].get('sum', 0):.0f} |")
                continue
            peer_rate = p[peer]["tokens"] / p[peer]["seconds"]
            ours_rate = r["tokens"] / ours_s
            repeated, ratio, spread = r.get("repeats", 1) > 1, ours_rate / peer_rate, ""
            if repeated:
                low, high = r["ratio_range"][peer]
                ratio, spread = r["ratio_median"][peer], f" ({low:.2f}-{high:.2f})"
            lines.append(f"| {name} | {what} | {rate(r['tokens'], ours_s)} | {peer_rate / 1e6:.2f} M/s | "
                         f"{ratio:.2f}{spread} | {p[peer]['rss'].get('sum', 0):.0f} |")
            if "load_seconds" in p[peer]:  # the tenth and earlier runs did not count it
                bare = p[peer]["tokens"] / (p[peer]["seconds"] - p[peer]["load_seconds"])
                ratio = r["ratio_median"][f"{peer} bare"] if repeated else ours_rate / bare
                lines.append(f"| {name} | {what}, peer's tokenizer load ({p[peer]['load_seconds']:.2f} s) "
                             f"not "
                             f"counted | {rate(r['tokens'], ours_s)} | {bare / 1e6:.2f} M/s | {ratio:.2f} | "
                             f"- |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", type=float, default=[1e6, 1e7, 1e8],
                        help="corpus sizes in tokens")
    parser.add_argument("--big-file-gb", type=float, default=2.0,
                        help="one plain JSONL file of this size; 0 = none")
    parser.add_argument("--file-tokens", type=float, default=8e6, help="tokens per gzip JSONL file")
    parser.add_argument("--shard-mb", type=int, default=32, help="ingest.shard_mb (splits the large file)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-peers", nargs="*", default=[], choices=["e2e", "tokenize", "index", "numpy"])
    parser.add_argument("--numpy-repeats", nargs="*", type=int, default=[1],
                        help="also run the numpy peer on the corpus counted r times (finds where it runs out "
                             "of memory)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="run each case up to --repeat-below tokens this many times: medians, ratio "
                             "ranges")
    parser.add_argument("--repeat-below", type=float, default=1e6,
                        help="largest corpus size that is repeated")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep each case's corpus and store under --work")
    parser.add_argument("--json", default=None, help="also write every measurement here")
    args = parser.parse_args()
    from tracecore.flows.calibrate import calibration_line

    print(calibration_line(), flush=True)
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rng = np.random.default_rng(0)
        words, weights = lexicon(rng)
        tokenizer, per_doc = make_tokenizer(work, rng, words, weights)
        cases = [(f"{int(s):.0e}".replace("+0", ""), s, 0.0) for s in args.sizes]
        if args.big_file_gb:
            cases.append((f"single {args.big_file_gb:g} GB file", 0, args.big_file_gb))
        results = {}
        for k, (name, size, big) in enumerate(cases):
            case_dir = work / f"case-{k}"
            subprocess.run(["rm", "-rf", str(case_dir)], check=False)
            start = time.perf_counter()
            paths = make_corpus(case_dir / "corpus", int(size), int(args.file_tokens), per_doc, 100 + k,
                                words, weights, big)
            print(f"{name}: corpus of {len(paths)} file(s) written in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
            results[name] = median_run([run_case(name, paths, case_dir, tokenizer, args)
                                        for _ in range(args.repeats if size and size <= args.repeat_below
                                                       else 1)])
            if not args.keep:
                subprocess.run(["rm", "-rf", str(case_dir)], check=False)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(report(results))
    print(calibration_line())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
    else:
        main()
