"""Benchmark: n-gram queries at engine speed and output tracing, on an index built from `bench/scale.py`'s
generated corpus (or a store you already have).

    .venv/bin/python bench/index_queries.py [--tokens 1e7] [--queries 1000] [--cli-calls 20]
        [--generations 100] [--generation-tokens 128] [--store STORE_WITH_AN_INDEX] [--work DIR]

Counts: `--queries` phrases (3-6 word windows of corpus documents, one in ten made unseen by a word that is in
no document) answered (a) by single `tracecore ngram count PHRASE --json` calls, of which `--cli-calls` are
timed and the mean is multiplied out (a thousand calls of ~2 s would take half an hour), (b) by one
`tracecore ngram count --file` process, (c) by a `tracecore ngram serve` process over loopback HTTP, one
request at a time, per-request latency from the client's side (p50 / p95), the server's start shown apart.
The answers of (b) and (c) are checked equal. Output tracing: `--generations` texts of `--generation-tokens`
tokens made of corpus windows and random tokens (a model's output mixes both), each traced with
`output_trace.trace_output` (min span 8, max count 10, 3 documents) by one opened engine: seconds per text.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
CLI = [sys.executable, "-m", "tracecore.flows.cli"]


def build_index(work: Path, tokens: float) -> str:
    """A store with ingest -> tokenize -> ngram run on a generated corpus of about `tokens` tokens."""
    import numpy as np
    from scale import lexicon, make_corpus, make_tokenizer

    store = work / f"store-{tokens:.0e}"
    rng = np.random.default_rng(0)
    words, weights = lexicon(rng)
    tokenizer, per_doc = make_tokenizer(work, rng, words, weights)
    paths = make_corpus(work / f"corpus-{tokens:.0e}", int(tokens), 5_000_000, per_doc, 0, words, weights)
    subprocess.run([*CLI, "run", "--store", str(store), "--stages", "ingest,tokenize,ngram",
                    "--set", f"ingest.paths={json.dumps(paths)}",
                    "--set", f"tokenize.tokenizer_path={tokenizer}",
                    "--set", "calibrate=false"], check=True, capture_output=True)
    return str(store)


def phrases(store: str, n: int, seed: int = 0) -> list[str]:
    """n word windows of documents; every tenth made unseen."""
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.index_query import latest_index

    s = ArtifactStore(store)
    docs_ref = s.manifest(s.manifest(s.manifest(latest_index(s))["inputs"]["tokens"])["inputs"]["documents"])
    texts = s.read_shard(docs_ref["ref"], 0, columns=["text"]).column(0).to_pylist()
    rng, out = random.Random(seed), []
    for k in range(n):
        words = rng.choice(texts).split(" ")
        start, size = rng.randrange(max(1, len(words) - 6)), rng.randint(3, 6)
        window = words[start:start + size]
        out.append(" ".join(window + (["qqqzzzx"] if k % 10 == 9 else [])))
    return out


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr[-800:])
    return time.perf_counter() - start, done.stdout


def serve(store: str, queries: list[str]) -> tuple[float, list[float], list[dict]]:
    """(server start seconds, per-request latencies, answers) through `tracecore ngram serve --port 0`."""
    start = time.perf_counter()
    server = subprocess.Popen([*CLI, "ngram", "serve", "--store", store, "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        started = time.perf_counter() - start
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        latencies, answers = [], []
        for q in queries:
            body = json.dumps({"query_type": "count", "query": q}).encode()
            t0 = time.perf_counter()
            request = urllib.request.Request(url, data=body, method="POST")
            with urllib.request.urlopen(request, timeout=60) as r:
                answers.append(json.loads(r.read()))
            latencies.append(time.perf_counter() - t0)
        return started, latencies, answers
    finally:
        server.terminate()
        server.wait(timeout=30)


def generations(store: str, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n token sequences of `length`: corpus windows of 6-30 tokens and random tokens between them."""
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.index_query import latest_index

    s = ArtifactStore(store)
    tokens_ref = s.manifest(latest_index(s))["inputs"]["tokens"]
    docs = s.read_shard(tokens_ref, 0, columns=["tokens"]).column(0).to_pylist()
    rng, out = random.Random(seed), []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            doc = rng.choice(docs)
            at, size = rng.randrange(max(1, len(doc) - 30)), rng.randint(6, 30)
            ids += doc[at:at + size] + [rng.randrange(1000, 30_000) for _ in range(rng.randint(1, 6))]
        out.append(ids[:length])
    return out


def trace_seconds(store: str, outputs: list[list[int]]) -> tuple[list[float], float]:
    """Per text: seconds of `trace_output` with one opened engine; and the mean coverage."""
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks import index_query as query
    from tracecore.tasks.output_trace import trace_output

    s = ArtifactStore(store)
    index = query.latest_index(s)
    seconds, covered = [], []
    with query.opened(s, index) as (engine, tok):
        for ids in outputs:
            t0 = time.perf_counter()
            covered.append(trace_output(s, index, engine, tok, tok.decode(ids), 8, 10, 3, ids=ids)["covered"])
            seconds.append(time.perf_counter() - t0)
    return seconds, statistics.mean(covered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e7)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--cli-calls", type=int, default=20)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--store", default=None, help="a store with a committed n-gram index (no build)")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    from tracecore.flows.calibrate import calibrate, calibration_line

    print(calibration_line(calibrate()), flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="index-queries-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    store = args.store or build_index(work, args.tokens)
    built = "" if args.store else f" (built in {time.perf_counter() - start:.0f} s)"
    print(f"store {store}{built}")
    queries = phrases(store, args.queries)
    (work / "queries.txt").write_text("\n".join(queries) + "\n")
    singles = [timed([*CLI, "ngram", "count", q, "--store", store, "--json"])[0]
               for q in queries[:args.cli_calls]]
    per_call = statistics.mean(singles)
    batch_s, batch_out = timed([*CLI, "ngram", "count", "--file", str(work / "queries.txt"),
                                "--store", store])
    started, latencies, answers = serve(store, queries)
    assert answers == [json.loads(line) for line in batch_out.splitlines()], "server and --file disagree"
    server_total = started + sum(latencies)
    cli_total = per_call * len(queries)
    p95 = statistics.quantiles(latencies, n=20)[18]
    rows = [f"| single CLI calls ({args.cli_calls} timed, x {len(queries) / args.cli_calls:.0f}) | "
            f"{cli_total:.1f} ({per_call:.2f} a call) | 1 |",
            f"| one `--file` process | {batch_s:.2f} | {cli_total / batch_s:.0f}x |",
            f"| `serve`, start + requests | {started:.2f} + {sum(latencies):.2f} | "
            f"{cli_total / server_total:.0f}x |"]
    print(f"\n| {len(queries)} count queries | seconds | vs. single CLI calls |\n|---|---|---|")
    print("\n".join(rows))
    p50 = statistics.median(latencies)
    print(f"\nserver latency per count: p50 {1000 * p50:.1f} ms, p95 {1000 * p95:.1f} ms", flush=True)
    seconds, covered = trace_seconds(store, generations(store, args.generations, args.generation_tokens))
    print(f"\noutput tracing: {len(seconds)} texts of {args.generation_tokens} tokens, "
          f"{statistics.mean(seconds):.3f} s a text (p50 {statistics.median(seconds):.3f}, max "
          f"{max(seconds):.3f}); mean coverage {covered:.2f}", flush=True)


if __name__ == "__main__":
    main()
