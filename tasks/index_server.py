"""`tracecore ngram serve`: one opened index answering JSON over loopback HTTP, so a thousand queries pay
the process start and the engine's opening once (a CLI call pays both every time).

Requests follow infini-gram's API shape: `POST /` with `{"query_type": ..., "query": ...}` and the type's
own fields; `count`, `search_docs` and `cnf` answer exactly what `tracecore ngram count|docs|cnf --json`
prints, `attribution` what `tracecore trace text --json` prints, `prob` and `ntd` as the engine's calls of
those names (with the prompt's tokens). `GET /` describes the index and the limits. Requests are answered one
at a time (the engine is not shared between threads); a malformed request gets status 400 and a one-line
`{"error": ...}`, never a traceback. The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer

from tracecore.configs.base import ConfigError
from tracecore.storage.store import ArtifactStore
from tracecore.tasks import index_query as query
from tracecore.tasks.ngram_engine import PairedEngine
from tracecore.tasks.output_trace import trace_output

QUERY_TYPES = ("count", "search_docs", "cnf", "prob", "ntd", "attribution")


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    """What one request may ask; a request beyond them is refused, naming the field."""

    max_body_bytes: int = 65_536
    max_query_chars: int = 2_000
    max_docs: int = 100
    max_window: int = 10_000


def field(request: dict, name: str, kind: type, default=None, low: int | None = None,
          high: int | None = None):
    """A request field of type `kind` (in its range), or the default; a wrong one is a BadRequest naming
    it."""
    value = request.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if low is not None and not low <= value <= high:
        raise BadRequest(f"field {name!r} must be in [{low}, {high}], got {value}")
    return value


def prompt_ids(tok, text: str) -> list[int]:
    """The tokens of a prompt as it reads mid-text (leading space), as the count forms' first."""
    return tok.encode(" " + text.strip(), add_special_tokens=False).ids


def prob(engine, tok, text: str) -> dict:
    """P(last token | the tokens before it), infini-gram's `prob` (-1 when the prompt is unseen)."""
    ids = prompt_ids(tok, text)
    if len(ids) < 2:
        raise BadRequest("prob needs a query of at least two tokens (a prompt and its next token)")
    if isinstance(engine, PairedEngine):
        prompt_cnt, cont_cnt = engine.count(ids[:-1])["count"], engine.count(ids)["count"]
        result = {"prompt_cnt": prompt_cnt, "cont_cnt": cont_cnt, "prob": cont_cnt / prompt_cnt if prompt_cnt
                  else -1.0}
    else:
        result = engine.prob(ids[:-1], ids[-1])
    return {"text": text, "prompt_ids": ids[:-1], "cont_id": ids[-1], "cont_token": tok.decode([ids[-1]]),
            **{k: result[k] for k in ("prompt_cnt", "cont_cnt", "prob")}}


def ntd(engine, tok, text: str, max_support: int) -> dict:
    """The next-token distribution after the prompt (infini-gram's `ntd`), each id with its decoded token."""
    if isinstance(engine, PairedEngine):
        raise BadRequest("ntd needs a u16 index (this one pairs symbols for ids above 65,535)")
    result = engine.ntd(prompt_ids(tok, text), max_support=max_support)
    return {"text": text, "prompt_cnt": result["prompt_cnt"], "approx": result["approx"],
            "result_by_token_id": {str(i): {**r, "token": tok.decode([i])}
                                   for i, r in result["result_by_token_id"].items()}}


def answer(store: ArtifactStore, index: str, engine, tok, request: dict, limits: Limits) -> dict:
    """One request's result, or a BadRequest naming what is wrong with it."""
    if not isinstance(request, dict):
        raise BadRequest(f"the request must be a JSON object, got {type(request).__name__}")
    kind = field(request, "query_type", str)
    if kind not in QUERY_TYPES:
        raise BadRequest(f"unknown query_type {kind!r} (one of: {', '.join(QUERY_TYPES)})")
    text = field(request, "query", str)
    if not text.strip():
        raise BadRequest("field 'query' is empty")
    if len(text) > limits.max_query_chars:
        raise BadRequest(f"field 'query' has {len(text)} characters > the server's {limits.max_query_chars}")
    if kind == "count":
        return query.count(engine, tok, text)
    if kind == "search_docs":
        maxnum = field(request, "maxnum", int, 10, 1, limits.max_docs)
        return query.docs(store, index, engine, tok, text, maxnum)
    if kind == "cnf":
        try:
            clauses = query.cnf_clauses(shlex.split(text))  # the CLI's grammar: "a" AND "b" OR "c"
        except ValueError as exc:
            raise BadRequest(f"field 'query': {exc}") from None
        return query.cnf(engine, tok, clauses, field(request, "window", int, 100, 1, limits.max_window))
    if kind == "prob":
        return prob(engine, tok, text)
    if kind == "ntd":
        return ntd(engine, tok, text, field(request, "max_support", int, 1000, 1, 100_000))
    return trace_output(store, index, engine, tok, text, field(request, "min_span", int, 8, 1, 10_000),
                        field(request, "max_span_count", int, 10, 1, 10**12),
                        field(request, "max_docs", int, 3, 0, limits.max_docs))


def handler(store: ArtifactStore, index: str, engine, tok, limits: Limits) -> type[BaseHTTPRequestHandler]:
    """The request handler bound to one opened index."""
    class Handler(BaseHTTPRequestHandler):
        def reply(self, status: int, body: dict, seconds: float = 0.0) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Latency-Ms", f"{seconds * 1000:.3f}")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.reply(200, {"index": index, "query_types": list(QUERY_TYPES), "limits": limits.__dict__})

        def do_POST(self) -> None:  # noqa: N802
            start = time.perf_counter()
            size = int(self.headers.get("Content-Length") or 0)
            if size > limits.max_body_bytes:
                self.close_connection = True
                return self.reply(413, {"error": f"request body of {size} bytes > the server's "
                                                 f"{limits.max_body_bytes}"})
            try:
                request = json.loads(self.rfile.read(size) or b"null")
                result = answer(store, index, engine, tok, request, limits)
            except json.JSONDecodeError as exc:
                return self.reply(400, {"error": f"the body is not JSON: {exc.msg} (column {exc.colno})"})
            except (BadRequest, ConfigError) as exc:
                return self.reply(400, {"error": str(exc)})
            self.reply(200, result, time.perf_counter() - start)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
            pass  # one line per request on stderr would cost more than a count

    return Handler


def make_server(store: ArtifactStore, index: str, engine, tok, host: str = "127.0.0.1", port: int = 0,
                limits: Limits = Limits()) -> HTTPServer:
    """A server over an opened index (port 0: any free port; `server.server_address` says which)."""
    return HTTPServer((host, port), handler(store, index, engine, tok, limits))
