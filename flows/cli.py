"""`tracecore` command line: run, make-sample, serve, ui, status, artifacts, calibrate.

Imports of Prefect and the stages happen inside the commands, after the offline environment
and the result-storage path are set (Prefect reads its settings at import time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tracecore.configs.schema import ConfigError
from tracecore.flows.runtime import configure_environment
from tracecore.tasks.runtime.registry import STAGES, load_config

EPILOG = """examples:
  tracecore run                                   # tiny profile, embedded sample world, local store
  tracecore run --stages ingest,tokenize --set ingest.paths='[data/*.jsonl.gz]'
  tracecore run --profile gpu --dask-address tcp://10.0.0.5:8786 --store s3://bucket/tracecore
  tracecore run --resume 20261124-201500-a1b2c3   # re-run a failed run: finished stages/shards are skipped
  tracecore status                                # what the latest run did / what a re-run will skip
  tracecore ngram count "born in the year"        # exact count in the latest index (both tokenizations)
  tracecore ngram docs "born in the year" --limit 3
  tracecore ngram cnf "Renou Nosenta" AND "1854" --window 50
  tracecore ui                                    # Prefect server + UI on 127.0.0.1:4200
  tracecore serve --cron "0 3 * * *"              # scheduled runs of the tiny profile (needs the server)
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="tiny", help="profile name in configs/ (tiny, gpu) or a YAML path "
                   "(default: tiny)")
    p.add_argument("--store", default=None, help="artifact store root: a local path or any fsspec URI "
                   "(file://, s3://, memory://); default from the profile (.tracecore/store)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set tokenize.vocab_size=8192 (repeatable; "
                   "values are YAML: 12, true, null, [a, b])")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracecore",
                                     description="Prefect + Dask pipelines for LLM data work; "
                                     "every stage reads and writes Parquet artifacts in a store.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (or some stages) as a Prefect flow on a Dask cluster")
    _add_common(run)
    run.add_argument("--stages", default=None,
                     help=f"comma-separated subset of {','.join(STAGES)}; the upstream "
                     "stages they need are reused from the store or computed (default: all)")
    run.add_argument("--dask-address", default=None, help="existing Dask scheduler, e.g. tcp://host:8786 "
                     "(default: start a LocalCluster for this run)")
    run.add_argument("--resume", default=None, metavar="RUN_ID", help="re-run RUN_ID with its saved config: "
                     "committed stages and shards are skipped; the run is looked up in --store, else the "
                     "profile's store, else the built-in profiles' stores")

    sample = sub.add_parser("make-sample", help="write the sample world (corpus, tasks, instructions, "
                            "preferences, long-context) to a local folder")
    _add_common(sample)
    sample.add_argument("--out", default="sample_world", help="output folder (default: ./sample_world)")

    serve = sub.add_parser("serve",
                           help="serve the pipeline as a scheduled Prefect deployment (needs a server: "
                           "`tracecore ui` in another shell and PREFECT_API_URL set)")
    _add_common(serve)
    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (03:00 daily)')
    serve.add_argument("--name", default="tracecore-scheduled",
                       help="deployment name (default: tracecore-scheduled)")
    serve.add_argument("--no-pause-on-shutdown", dest="pause_on_shutdown", action="store_false",
                       help="keep the schedule active after this process stops (default: Prefect pauses it)")

    ui = sub.add_parser("ui", help="start the Prefect server + UI on loopback and print PREFECT_API_URL")
    ui.add_argument("--host", default="127.0.0.1",
                    help="bind address (default: 127.0.0.1; other hosts expose "
                    "the UI and API to the network)")
    ui.add_argument("--port", type=int, default=4200)

    docs = sub.add_parser("docs",
                          help="write the docs' stage pages (docs/stages/*.md) from the registry and the "
                          "stages' pydantic configs; --check changes nothing and exits 1 when a page is "
                          "stale")
    docs.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a page differs from the code")

    sub.add_parser("calibrate",
                   help="a few seconds of fixed work (fp32 matmul GFLOP/s, BPE tokens/s): quote it "
                   "beside any wall-clock figure, since same-size machines differ ~2x")

    ngram = sub.add_parser("ngram", help="query a committed infini-gram index: count, docs, cnf",
                           description="Query the n-gram index of a store (the latest one unless --index). "
                           "Phrases are counted in both tokenizations they have in running text.")
    ngram_sub = ngram.add_subparsers(dest="query", required=True)
    for name, text in (("count", "exact count of a phrase"),
                       ("docs", "documents containing a phrase: id, file, line, snippet"),
                       ("cnf", 'co-occurrence count: "a" AND "b" [OR "c"] within --window tokens')):
        q = ngram_sub.add_parser(name, help=text)
        q.add_argument("terms", nargs="*",
                       help="the phrase" if name != "cnf" else 'phrases joined by AND / OR')
        q.add_argument("--file", default=None, help=(
            "one query per line (cnf: terms in shell quoting, joined by AND / OR), answered by one engine in "
            "one process; prints one JSON object per line, an error object for a malformed line"))
        q.add_argument("--profile", default="tiny", help="profile whose store to read (default: tiny)")
        q.add_argument("--store", default=None, help="artifact store root (default: the profile's store)")
        q.add_argument("--index", default=None,
                       help="index artifact, e.g. ngram_index/<fp> (default: latest)")
        q.add_argument("--json", action="store_true", help="print JSON for scripts")
        if name == "docs":
            q.add_argument("--limit", type=int, default=10, help="documents to show (default: 10)")
        if name == "cnf":
            q.add_argument("--window", type=int, default=100,
                           help="max tokens between the clauses (default: 100)")

    serve = ngram_sub.add_parser("serve", help="answer queries over loopback HTTP (JSON, infini-gram's)",
                                 description="One opened index answers POST / {\"query_type\": count | "
                                 "search_docs | cnf | prob | ntd | attribution, \"query\": ...}; count, "
                                 "search_docs and cnf return what `tracecore ngram ... --json` prints. GET / "
                                 "describes the index and the limits. Ctrl-C stops it.")
    serve.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 = any free one)")
    serve.add_argument("--host", default="127.0.0.1", help=(
        "address to bind (default: 127.0.0.1, loopback only; anything else exposes the corpus)"))
    serve.add_argument("--max-body-bytes", type=int, default=65_536, help="largest request body (64 KiB)")
    serve.add_argument("--max-query-chars", type=int, default=2_000, help="longest query text (2000)")
    for q in (serve, trace_text := sub.add_parser(
            "trace", help="trace a text (a model's output) to the corpus: maximal spans, documents, coverage",
            description="The maximal spans of each text that occur in the corpus's n-gram index (at least "
            "--min-span tokens, seen at most --max-span-count times), with their documents (id, file, line, "
            "snippet), and the share of its tokens inside an occurring span of at least --min-span tokens. "
            "Prints one JSON object per text.")):
        q.add_argument("--profile", default="tiny", help="profile whose store to read (default: tiny)")
        q.add_argument("--store", default=None, help="artifact store root (default: the profile's store)")
        q.add_argument("--index", default=None, help="index artifact, ngram_index/<fp> (default: latest)")
    trace_text.add_argument("what", choices=["text"], help="what to trace (a text)")
    trace_text.add_argument("text", nargs="?", default=None, help="the text (or --file)")
    trace_text.add_argument("--file", default=None, help=(
        "a JSONL file of generations (one object per line, the text in --field) or a .txt file (a text a "
        "line), traced by one opened engine"))
    trace_text.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    trace_text.add_argument("--min-span", type=int, default=8, help="shortest span, in tokens (default: 8)")
    trace_text.add_argument("--max-span-count", type=int, default=10, help=(
        "leave out spans seen more often than this (common phrases; default: 10)"))
    trace_text.add_argument("--max-docs", type=int, default=3, help="documents listed per span (default: 3)")

    model = sub.add_parser("model", help="model files as store artifacts: import a GGUF once",
                           description="Convert a GGUF file (or a packaged model: smollm2-135m-instruct) "
                                       "into a "
                           "Hugging Face safetensors folder in the store, once; stages taking a model path "
                           "do the same on their own.")
    model_sub = model.add_subparsers(dest="action", required=True)
    imp = model_sub.add_parser("import", help="convert FILE.gguf into model_import/<fp> and print its folder")
    imp.add_argument("file", help="a .gguf file or a packaged model's name")
    imp.add_argument("--profile", default="tiny", help="profile whose store to use (default: tiny)")
    imp.add_argument("--store", default=None, help="artifact store root (default: the profile's store)")

    status_help = ("stages of a run: state, artifacts, shards done, rows, rejects, and what a re-run would "
                   "skip")
    for name, text in (("status", status_help),
                       ("artifacts", "artifacts of a run with their paths, rows and checksums"),
                       ("readme",
                        ("re-render the README's measured tables (<!-- tracecore:begin NAME --> blocks) "
                                  "from a run's artifacts, so they cannot go stale"))):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_id", nargs="?", default=None, help="run id (default: the latest run)")
        p.add_argument("--profile", default="tiny", help="profile whose store to read (default: tiny)")
        p.add_argument("--store", default=None, help="artifact store root (default: the profile's store)")
        if name == "readme":
            p.add_argument("--readme", action="append", default=None, help=(
                "file to update; repeatable (default: README.md and every docs/**/*.md with a block)"))
            p.add_argument("--check", action="store_true",
                           help="change nothing; exit 1 if a result block would "
                           "change (the timings block is machine-dependent and not checked)")
        else:
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "status":
            p.add_argument("--checksums", action="store_true", help="hash every shard and file against its "
                           "record (a run trusts matching sizes and modification stamps, reading no data)")
    return parser


def profile_store(profile: str) -> str:
    """The store a profile names (`store:`), else the default, without validating the rest of it."""
    from tracecore.configs.profiles import read_profile
    from tracecore.configs.schema import PipelineBase

    return read_profile(profile)[0].get("store") or PipelineBase.model_fields["store"].default


def resume_store(run_id: str, profile: str, store: str | None):
    """The store that holds `run_id`: `--store`, else the profile's store, else the first built-in profile's
    store that has it (a run of `configs/gpu.yaml` lives in that profile's store, not in tiny's)."""
    from tracecore.configs.schema import PROFILE_DIR
    from tracecore.storage.runs import run_path
    from tracecore.storage.store import ArtifactStore

    if store:
        return ArtifactStore(store)
    candidates = dict.fromkeys([profile_store(profile)] + [profile_store(p.stem)
                                                           for p in sorted(PROFILE_DIR.glob("*.yaml"))])
    for uri in candidates:
        found = ArtifactStore(uri)
        if found.fs.exists(run_path(found, run_id)):
            return found
    raise ConfigError(f"--resume {run_id}: no such run in the stores of profile {profile!r} or the built-in "
                      f"profiles "
                      f"({', '.join(candidates)}); pass --store")


def cmd_run(args: argparse.Namespace) -> int:
    from tracecore.storage.runs import new_run_id, read_run

    if args.resume:
        store = resume_store(args.resume, args.profile, args.store)
        saved = read_run(store, args.resume)["config"]
        cfg = load_config(args.profile, args.overrides) if args.overrides else None
        config = {**saved, **({} if cfg is None else cfg.model_dump(mode="json"))}
        run_id = args.resume
    else:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        cfg = load_config(args.profile, args.overrides, store=args.store, stages=stages)
        config, run_id = cfg.model_dump(mode="json"), new_run_id()
    if args.dask_address:
        config["dask"]["address"] = args.dask_address
    configure_environment(config["store"])
    from tracecore.flows.pipeline import pipeline

    print(f"tracecore run {run_id}: stages {','.join(config['stages'])}, store {config['store']}", flush=True)
    result = pipeline.with_options(flow_run_name=f"tracecore-{run_id}")(config=config, run_id=run_id)
    print(f"\nrun {run_id} completed\nreport:    {result['report']}\nartifacts: {config['store']}/artifacts")
    return 0


def cmd_make_sample(args: argparse.Namespace) -> int:
    from tracecore.tasks.world import write_sample

    cfg = load_config(args.profile, args.overrides)
    counts = write_sample(cfg.sample, args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), **counts}, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.profile, args.overrides, store=args.store)  # fail fast on a bad profile
    configure_environment(cfg.store)
    from tracecore.flows.deploy import serve

    print(f"serving deployment tracecore-pipeline/{args.name} on cron {args.cron!r} (Ctrl-C stops; "
          f"the schedule is {'paused' if args.pause_on_shutdown else 'kept'} on shutdown)", flush=True)
    serve(args.profile, args.overrides, args.store, args.cron, args.name, args.pause_on_shutdown)
    return 0


def store_of(args: argparse.Namespace) -> str:
    """`--store`, else the profile's store. A store that does not exist is an error (opening one would leave
    an empty folder behind)."""
    import fsspec

    uri = args.store or load_config(args.profile).store
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"store {uri!r} does not exist (profile {args.profile!r}; pass --store or "
                                f"--profile)")
    return uri


def block_files(given: list[str] | None, root: Path = Path(".")) -> list[Path]:
    """The files `tracecore readme` renders: those given, else the README and every docs page with a block
    (relative to `root`)."""
    if given:
        return [Path(p) for p in given]
    pages = sorted(p for p in (root / "docs").rglob("*.md") if "tracecore:begin" in p.read_text())
    return [Path("README.md"), *(p.relative_to(root) for p in pages)]


def cmd_readme(args: argparse.Namespace) -> int:
    from tracecore.flows.readme import update_readme
    from tracecore.storage.runs import read_run
    from tracecore.storage.store import ArtifactStore

    store = ArtifactStore(store_of(args))
    record = read_run(store, args.run_id)
    stale = 0
    for path in block_files(args.readme):
        text, changed = update_readme(path.read_text(), store, record)
        if args.check:  # wall-clock timings differ between machines; results are deterministic
            results = [name for name in changed if name != "timings"]
            print(f"{path}: result blocks that differ from run {record['run_id']}: "
                  f"{', '.join(results) or 'none'}")
            stale += bool(results)
            continue
        path.write_text(text)
        print(f"{path}: {len(changed)} block(s) re-rendered from run {record['run_id']}: "
              f"{', '.join(changed) or 'none'}")
    return 1 if stale else 0


def cmd_docs(args: argparse.Namespace) -> int:
    from tracecore.flows.docs import write_stage_pages

    changed = write_stage_pages(check=args.check)
    verb = "stale" if args.check else "written"
    print(f"stage pages {verb}: {', '.join(p.name for p in changed) or 'none'}")
    return 1 if (args.check and changed) else 0


def ngram_answer(store, index: str, engine, tok, args: argparse.Namespace, terms: list[str]) -> dict:
    """One query's result: exactly what a single `tracecore ngram ...` call computes."""
    from tracecore.tasks import index_query as query

    if not terms or not " ".join(terms).strip():
        raise ConfigError(f"ngram {args.query}: empty query")
    if args.query == "count":
        return query.count(engine, tok, " ".join(terms))
    if args.query == "docs":
        return query.docs(store, index, engine, tok, " ".join(terms), args.limit)
    return query.cnf(engine, tok, query.cnf_clauses(terms), args.window)


def ngram_batch(store, index: str, engine, tok, args: argparse.Namespace) -> int:
    """`--file`: every line through one opened engine (the start-up a CLI call pays once), JSON lines out; a
    malformed line gives an error object naming its line, and the rest still run."""
    import shlex

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"ngram {args.query} --file: {path} does not exist")
    failed = 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            terms = shlex.split(line) if args.query == "cnf" else [line.strip()]
            print(json.dumps(ngram_answer(store, index, engine, tok, args, terms)))
        except (ConfigError, ValueError) as exc:
            failed += 1
            print(json.dumps({"line": number, "query": line, "error": f"{path}:{number}: {exc}"}))
    return 1 if failed else 0


def cmd_ngram_serve(args: argparse.Namespace) -> int:
    """`ngram serve`: the index opened once, answering until interrupted."""
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks import index_query as query
    from tracecore.tasks.index_server import Limits, make_server

    store = ArtifactStore(store_of(args))
    index = args.index or query.latest_index(store)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_query_chars=args.max_query_chars)
    with query.opened(store, index) as (engine, tok):
        server = make_server(store, index, engine, tok, args.host, args.port, limits)
        host, port = server.server_address[:2]
        print(f"serving {index} on http://{host}:{port}/ (POST JSON queries; Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


def trace_texts(args: argparse.Namespace) -> list[str]:
    """The texts `trace text` traces: the argument, or every line of --file (JSONL: its --field)."""
    if bool(args.file) == bool(args.text):
        raise ConfigError("trace text: give the text or --file, not both or neither")
    if args.text:
        return [args.text]
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"trace text --file: {path} does not exist")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if path.suffix == ".txt":
        return [line for _, line in lines]
    texts = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: bad JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get(args.field), str):
            raise ConfigError(f"{path}:{number}: no string field {args.field!r} (set --field)")
        texts.append(row[args.field])
    return texts


def cmd_trace(args: argparse.Namespace) -> int:
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks import index_query as query
    from tracecore.tasks.output_trace import trace_output

    texts = trace_texts(args)
    store = ArtifactStore(store_of(args))
    index = args.index or query.latest_index(store)
    with query.opened(store, index) as (engine, tok):
        for text in texts:
            print(json.dumps(trace_output(store, index, engine, tok, text, args.min_span, args.max_span_count,
                                          args.max_docs)))
    return 0


def cmd_ngram(args: argparse.Namespace) -> int:
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks import index_query as query

    if args.query == "serve":
        return cmd_ngram_serve(args)

    if bool(args.file) == bool(args.terms):
        raise ConfigError(f"ngram {args.query}: give the query's terms or --file, not both or neither")
    store = ArtifactStore(store_of(args))
    index = args.index or query.latest_index(store)
    with query.opened(store, index) as (engine, tok):
        if args.file:
            return ngram_batch(store, index, engine, tok, args)
        result = ngram_answer(store, index, engine, tok, args, args.terms)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"index {index}")
    if args.query == "count":
        print(f"{result['text']!r}: {result['count']}  (" + ", ".join(
            f"{f['tokens']}: {f['count']}" for f in result["forms"]) + ")")
    elif args.query == "docs":
        print(f"{result['text']!r}: {result['occurrences']} occurrences; "
              f"{len(result['documents'])} documents")
        for d in result["documents"]:
            print(f"  {d['id']}  {d['file']}:{d['line']}\n    {d['snippet']}")
    else:
        flag = " (approximate: a clause is more frequent than max_clause_freq)" if result["approx"] else ""
        print(" AND ".join("(" + " OR ".join(map(repr, c)) + ")" for c in result["clauses"])
              + f" within {result['window']} tokens: {result['count']}{flag}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.gguf_models import import_gguf
    from tracecore.tasks.runtime.common import get_logger

    store = ArtifactStore(args.store or load_config(args.profile).store)  # importing may start a store
    ref = import_gguf(store, args.file, "model import", get_logger())
    manifest = store.manifest(ref)
    print(f"{ref}: {manifest['model_type']}, {manifest['parameters']:,} parameters, from "
          f"{manifest['source']} "
          f"(sha256 {manifest['source_sha256'][:16]})\nfolder: {store.display_path(ref)}")
    return 0


def status_rows(store_uri: str, run_id: str | None, checksums: bool = False) -> tuple[dict, list[dict]]:
    """Per artifact: what the run recorded, and what the store holds now (= what a re-run skips)."""
    from tracecore.flows.report import artifact_rows
    from tracecore.storage.runs import read_run
    from tracecore.storage.store import ArtifactStore

    store = ArtifactStore(store_uri)
    record = read_run(store, run_id)
    columns = ("stage", "output", "artifact", "run_status", "committed", "shards_done", "shards", "rows",
               "rejects", "on_rerun", "error")
    rows = [{c: r[c] for c in columns} for r in ({**r,
                                                  "run_status": r["status"]}
                                                      for r in artifact_rows(store, record, checksums))]
    return record, rows


def cmd_status(args: argparse.Namespace, artifacts: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    uri = store_of(args)
    record, rows = status_rows(uri, args.run_id, getattr(args, "checksums", False))
    if artifacts:
        from tracecore.storage.store import ArtifactStore

        store = ArtifactStore(uri)
        rows = [{"artifact": r["artifact"], "path": store.display_path(r["artifact"]), "rows": r["rows"],
                 "checksum": store.manifest(r["artifact"])["checksum"][:16] if r["committed"]
                     else "(uncommitted)"}
                for r in rows]
    if args.json:
        print(json.dumps({"run_id": record["run_id"], "state": record["state"], "rows": rows}, indent=2))
        return 0
    table = Table(title=f"run {record['run_id']} · {record['state']} · report: {record.get('report', '-')}")
    for col in rows[0] if rows else ["artifact"]:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    Console(width=200).print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "make-sample":
            return cmd_make_sample(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "calibrate":
            from tracecore.flows.calibrate import calibration_line

            print(calibration_line())
            return 0
        if args.command == "ui":
            from tracecore.flows.deploy import ui

            return ui(args.host, args.port)
        if args.command == "readme":
            return cmd_readme(args)
        if args.command == "docs":
            return cmd_docs(args)
        if args.command == "ngram":
            return cmd_ngram(args)
        if args.command == "model":
            return cmd_model(args)
        if args.command == "trace":
            return cmd_trace(args)
        return cmd_status(args, artifacts=args.command == "artifacts")
    except (ConfigError, FileNotFoundError) as exc:
        print(f"tracecore: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the stage already logged its traceback through Prefect
        print(f"tracecore: run failed: {type(exc).__name__}: {exc}\n"
              "  `tracecore status` shows what finished; `tracecore run --resume RUN_ID` continues.",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
