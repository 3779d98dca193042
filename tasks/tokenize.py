"""Stage `tokenize`: train a byte-level BPE (or load a user's tokenizer) and write token shards.

Token shards hold `list<uint16>` when the vocabulary fits (ids < 65535, which leaves 0xFFFF free
for infini-gram's document separator) and `list<uint32>` otherwise, one shard per documents shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.common import worker_threads
from tracecore.tasks.runtime.stage import Stage, StageRun


class TokenizeConfig(Strict):
    """Train (or load) a tokenizer and write token shards."""

    tokenizer_path: str | None = Field(None, description="local HF tokenizer folder; None = train BPE")
    vocab_size: int = Field(4096, ge=260, le=65_535)
    min_frequency: int = Field(2, ge=1)
    train_docs: int = Field(20_000, ge=1, description="documents sampled to train the BPE")
    split_digits: bool = Field(False, description="one token per digit (as in Llama): numbers can be copied "
                               "digit by digit; needed for the needle task on a tiny model")
    batch_size: int = Field(512, ge=1)
    parallel_encode: Literal["auto"] | bool = Field("auto", description=(
        "a task encodes with the tokenizers library's own thread pool (every core of its machine), so a "
        "worker left with the last shard uses the cores its finished peers leave idle. auto: with fewer than "
        "2 documents shards per Dask worker thread, on for each shard larger than an even share of the work, "
        "else only for the last threads - 1 shards of the queue (on for all would oversubscribe the cores; "
        "see docs/development/decisions.md)"))


EOS, PAD = "<|endoftext|>", "<|pad|>"


class TokenizerError(ValueError):
    pass


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int, out_dir: Path,
              split_digits: bool = False) -> None:
    """Byte-level BPE with `tokenizers`, saved as a Hugging Face tokenizer folder. `split_digits` keeps every
    digit its own token (as Llama's and Qwen's tokenizers do), so a number is never merged into a word piece
    that depends on its neighbours: a model can then copy a passkey digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))


def check_user_tokenizer(path: str) -> Path:
    """A fast HF tokenizer folder whose declared eos_token is in its vocabulary, checked when the run is
    planned (before any stage works). Read from the folder's JSON, not built: building it took the flow
    process 0.05-0.1 s of a 1.3 s tokenize stage at 10^6 tokens, and every task builds it anyway
    (`load_tokenizer`, which names a file the library cannot build). Not `transformers` either: importing it
    cost 1.4 s, and AutoTokenizer
    silently *adds* an eos_token missing from the vocabulary, an id the model's embedding does not have."""
    checked_tokenizer_json(path)
    return Path(path)


def checked_tokenizer_json(path: str) -> bytes:
    """The bytes of a user tokenizer folder's tokenizer.json, after `check_user_tokenizer`'s checks (read
    once:
    planning hashes the same bytes)."""
    folder = Path(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"tokenize.tokenizer_path: {path!r} has no tokenizer.json (a fast HF tokenizer "
                             "folder is required)")
    data = file.read_bytes()
    try:
        vocabulary = tokenizer_vocabulary(json.loads(data))
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise TokenizerError(f"tokenize.tokenizer_path: {path!r}: tokenizer.json cannot be loaded "
                             f"({type(err).__name__}: {err})") from None
    eos = declared_eos_token(folder)
    if eos is None:
        raise TokenizerError(f"tokenize.tokenizer_path: tokenizer at {path!r} defines no eos_token "
                             "(tokenizer_config.json / special_tokens_map.json)")
    if eos not in vocabulary:
        raise TokenizerError(f"tokenize.tokenizer_path: tokenizer at {path!r}: eos_token {eos!r} is not in "
                             f"its "
                             "vocabulary")
    return data


def tokenizer_vocabulary(spec: dict) -> set[str]:
    """The tokens a tokenizer.json defines: its added tokens and its model's vocabulary (a mapping for BPE,
    WordPiece and WordLevel; [piece, score] pairs for Unigram)."""
    vocab = spec["model"]["vocab"]
    pieces = vocab.keys() if isinstance(vocab, dict) else (entry[0] for entry in vocab)
    return {t["content"] for t in spec.get("added_tokens") or []} | set(pieces)


def load_tokenizer(folder: str | Path, source: str):
    """`tokenizers.Tokenizer` of a tokenizer folder; one that the library cannot build (valid JSON, unknown
    model type, a newer format) is named in one line, not a library traceback (`source`: where it is
    stored)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    except Exception as err:  # noqa: BLE001 (tokenizers raises a bare Exception for a malformed file)
        raise TokenizerError(f"tokenize.tokenizer_path: {source!r}: tokenizer.json cannot be loaded "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def declared_eos_token(folder: Path) -> str | None:
    """The eos_token as Hugging Face resolves it: tokenizer_config.json, else special_tokens_map.json; a plain
    string or an AddedToken mapping."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get("eos_token")
        except (ValueError, AttributeError):
            raise TokenizerError(f"tokenize.tokenizer_path: {str(file)!r} is not a JSON object") from None
        value = value.get("content") if isinstance(value, dict) else value
        if value:
            return value
    return None


def token_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65_535 else pa.uint32()


def encoded_batches(tok, texts: list[str], batch_size: int, overlap: bool) -> Iterator[list]:
    """The encodings of `texts`, one list per batch, in order. `overlap`: the next batch encodes in a helper
    thread while the caller converts this one (`encode_batch` releases the GIL). With the tokenizers pool on,
    the pool would otherwise idle while one thread turns a batch into arrays. Without the pool a worker's own
    thread is the only encoder and its cores are shared with other workers: nothing idles."""
    batches = (texts[i:i + batch_size] for i in range(0, len(texts), batch_size))
    if not overlap:
        yield from (tok.encode_batch(batch, add_special_tokens=False) for batch in batches)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="tracecore-encode") as pool:
        pending = None
        for batch in batches:
            # starts when `pending` ends
            queued = pool.submit(tok.encode_batch, batch, add_special_tokens=False)
            if pending is not None:
                yield pending.result()
            pending = queued
        if pending is not None:
            yield pending.result()


def encode_column(tok, texts: list[str], batch_size: int, dtype: pa.DataType,
                  overlap: bool = False) -> pa.ListArray:
    """Token ids as one Arrow list column, built from flat numpy chunks per batch: the shard's ids never
    exist as Python lists of ints (~36 bytes per token), so memory stays ~the Arrow column's."""
    values, lengths = [], []
    for encodings in encoded_batches(tok, texts, batch_size, overlap):
        sizes = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        values.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings),
                                  dtype.to_pandas_dtype(), int(sizes.sum())))
        lengths.append(sizes)
    sizes = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.concatenate(values) if values else np.zeros(0, dtype.to_pandas_dtype())
    return pa.LargeListArray.from_arrays(offsets, flat).cast(pa.list_(dtype))


@contextlib.contextmanager
def encoder_parallelism(enabled: bool):
    """TOKENIZERS_PARALLELISM for one task (the runtime sets it false for the process; the library reads it at
    every call). On: shards are uneven (a file is a shard), so without it the last worker encodes alone on one
    core while the others idle."""
    key = "TOKENIZERS_PARALLELISM"
    before = os.environ.get(key)
    os.environ[key] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def tokenize_shard(store_uri: str, ref: str, shard: int, item: tuple[str, str, bool],
                   batch_size: int) -> dict:
    """Encode one documents shard into a token shard (item: documents ref, tokenizer ref, parallel
    encoding)."""
    store = ArtifactStore(store_uri)
    documents_ref, tokenizer_ref, parallel = item
    with store.local_dir(tokenizer_ref) as folder:
        tok = load_tokenizer(folder, store.display_path(tokenizer_ref))
    table = store.read_shard(documents_ref, shard, columns=["id", "text"])
    start = time.perf_counter()
    with encoder_parallelism(parallel):
        tokens = encode_column(tok, table.column("text").to_pylist(), batch_size,
                               token_type(tok.get_vocab_size()), overlap=parallel)
    seconds = time.perf_counter() - start
    out = pa.table({"doc_id": table.column("id"), "tokens": tokens,
                    "n_tokens": pc.list_value_length(tokens).cast(pa.int32())})
    return store.write_shard(ref, shard, out, tokens=len(tokens.values), encode_seconds=round(seconds, 4))


def user_tokenizer(pipeline_cfg, upstream: dict[str, str], store: ArtifactStore) -> tuple[dict, dict]:
    """A user's tokenizer is an input: checked (`check_user_tokenizer`) and its tokenizer.json's hash
    fingerprinted (and so in the lineage), when the run is planned."""
    path = pipeline_cfg.tokenize.tokenizer_path
    if not path:
        return {}, {}
    return {"user_tokenizer": hashlib.sha256(checked_tokenizer_json(path)).hexdigest()}, {}


def build_tokenizer(run: StageRun) -> None:
    """Train (or copy the user's) tokenizer into the store, unless already committed."""
    store, cfg, documents_ref = run.store, run.cfg, run.inputs["documents"]
    if store.is_committed(run.ref("tokenizer")):
        return
    with tempfile.TemporaryDirectory(prefix="tracecore-tok-") as tmp:
        if cfg.tokenizer_path:
            store.put_dir(run.ref("tokenizer"), cfg.tokenizer_path)  # checked when the run was planned
        else:
            texts: list[str] = []
            for m in store.markers(documents_ref):
                texts += store.read_shard(documents_ref, m["shard"], columns=["text"]).column(0).to_pylist()
                if len(texts) >= cfg.train_docs:
                    break
            train_bpe(texts[: cfg.train_docs], cfg.vocab_size, cfg.min_frequency, Path(tmp), cfg.split_digits)
            store.put_dir(run.ref("tokenizer"), tmp)
    run.commit("tokenizer")


def parallel_shards(setting: str | bool, sizes: list[int], threads: int) -> list[bool]:
    """`tokenize.parallel_encode` per shard (`sizes`: the documents shards' bytes). auto, with fewer than 2
    shards per worker thread: on for a shard larger than an even share of the work, which alone outlasts the
    others while their workers idle; off for the rest, which would only oversubscribe the cores. With more
    shards: the last `threads - 1` of the queue (Dask starts tasks in submission order), which run while the
    finished workers idle. The measurements behind both rules: docs/development/decisions.md."""
    shards = len(sizes)
    if setting != "auto":
        return [bool(setting)] * shards
    if threads <= 0:
        return [False] * shards
    if shards < 2 * threads:
        total = sum(sizes)
        return [shards == 1 or size * threads > total for size in sizes]
    return [False] * (shards - threads + 1) + [True] * (threads - 1)


def run_tokenize(run: StageRun) -> None:
    store, documents_ref = run.store, run.inputs["documents"]
    build_tokenizer(run)
    n_shards = store.manifest(documents_ref)["shards"]
    sizes = [m["bytes"] for m in sorted(store.markers(documents_ref), key=lambda m: m["shard"])]
    setting = run.cfg.parallel_encode
    parallel = parallel_shards(setting, sizes, worker_threads(run.cluster) if setting == "auto" else 1)
    report = run.map("tokens", tokenize_shard, [(documents_ref, run.ref("tokenizer"), p) for p in parallel],
                     batch_size=run.cfg.batch_size)
    tokens = sum(m["tokens"] for m in report.markers)
    computed_tokens = report.sum_computed("tokens")
    stats = {"tokens": tokens, "seconds": report.seconds, "skipped_shards": report.skipped,
             "tokens_per_second": round(computed_tokens / report.seconds, 1) if report.computed else None,
             "tokenizer": run.ref("tokenizer")}
    run.commit("tokens", stats, expected_shards=n_shards)
    run.log.info("tokenize: %d tokens in %d shards (%d skipped), %s tokens/s", tokens, n_shards,
                 report.skipped, stats["tokens_per_second"])


STAGE = Stage("tokenize", TokenizeConfig, {"tokens": "tokens", "tokenizer": "tokenizer"}, run_tokenize,
              needs={"documents": "ingest.documents"}, external=user_tokenizer,
              description="train (or load) a tokenizer and write token shards")
