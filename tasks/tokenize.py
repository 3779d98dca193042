"""Stage `tokenize`: train a byte-level BPE (or load a user's tokenizer) and write token shards.

Token shards hold `list<uint16>` when the vocabulary fits (ids < 65535, which leaves 0xFFFF free
for infini-gram's document separator) and `list<uint32>` otherwise, one shard per documents shard.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from tracecore.configs.schema import TokenizeConfig
from tracecore.storage.lineage import code_version, lineage
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.common import already_committed, get_logger, map_shards, plan_ref, stage_task

EOS, PAD = "<|endoftext|>", "<|pad|>"


class TokenizerError(ValueError):
    pass


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int, out_dir: Path, split_digits: bool = False) -> None:
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))


def check_user_tokenizer(path: str) -> Path:
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerError(f"tokenize.tokenizer_path: {path!r} has no tokenizer.json (a fast HF tokenizer "
                             "folder is required)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenize.tokenizer_path: tokenizer at {path!r} defines no eos_token")
    return folder


def token_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65_535 else pa.uint32()


def tokenize_shard(store_uri: str, ref: str, shard: int, item: tuple[str, str], batch_size: int) -> dict:
    """Encode one documents shard into a token shard."""
    from tokenizers import Tokenizer

    store = ArtifactStore(store_uri)
    documents_ref, tokenizer_ref = item
    with store.local_dir(tokenizer_ref) as folder:
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    table = store.read_shard(documents_ref, shard, columns=["id", "text"])
    start = time.perf_counter()
    texts = table.column("text").to_pylist()
    ids: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        ids += [enc.ids for enc in tok.encode_batch(texts[i:i + batch_size], add_special_tokens=False)]
    seconds = time.perf_counter() - start
    dtype = token_type(tok.get_vocab_size())
    out = pa.table({"doc_id": table.column("id"), "tokens": pa.array(ids, type=pa.list_(dtype)),
                    "n_tokens": pa.array([len(x) for x in ids], type=pa.int32())})
    n_tokens = sum(len(x) for x in ids)
    return store.write_shard(ref, shard, out, tokens=n_tokens, encode_seconds=round(seconds, 4))


def plan_tokenize(cfg: TokenizeConfig, documents_ref: str) -> dict[str, str]:

    inputs = {"documents": documents_ref}
    if cfg.tokenizer_path:
        inputs["user_tokenizer"] = hashlib.sha256((Path(cfg.tokenizer_path) / "tokenizer.json").read_bytes()).hexdigest()
    tokenizer = plan_ref("tokenizer", "tokenize", cfg.fingerprint(), inputs, __name__)
    return {"tokenizer": tokenizer, "tokens": f"tokens/{tokenizer.split('/')[1]}"}


def build_tokenizer(store: ArtifactStore, cfg: TokenizeConfig, documents_ref: str, ref: str, record: dict) -> None:
    """Train (or copy the user's) tokenizer into the store, unless already committed."""
    if store.is_committed(ref):
        return
    with tempfile.TemporaryDirectory(prefix="tracecore-tok-") as tmp:
        if cfg.tokenizer_path:
            store.put_dir(ref, check_user_tokenizer(cfg.tokenizer_path))
        else:
            texts: list[str] = []
            for m in store.markers(documents_ref):
                texts += store.read_shard(documents_ref, m["shard"], columns=["text"]).column(0).to_pylist()
                if len(texts) >= cfg.train_docs:
                    break
            train_bpe(texts[: cfg.train_docs], cfg.vocab_size, cfg.min_frequency, Path(tmp), cfg.split_digits)
            store.put_dir(ref, tmp)
    store.commit(ref, record)


def run_tokenize(store_uri: str, cfg: TokenizeConfig, documents_ref: str, refs: dict[str, str],
                 address: str | None = None) -> dict[str, str]:

    store, log = ArtifactStore(store_uri), get_logger()
    with store.lock(refs["tokens"]):
        if already_committed(store, "tokenize", refs["tokens"]):
            return refs
        record = lineage("tokenize", cfg.fingerprint(), {"documents": documents_ref}, code_version(__name__))
        build_tokenizer(store, cfg, documents_ref, refs["tokenizer"], record)
        n_shards = store.manifest(documents_ref)["shards"]
        report = map_shards("tokenize", store, refs["tokens"], tokenize_shard,
                            [(documents_ref, refs["tokenizer"])] * n_shards, address, batch_size=cfg.batch_size)
        tokens = sum(m["tokens"] for m in report.markers)
        computed_tokens = report.sum_computed("tokens")
        stats = {"tokens": tokens, "seconds": report.seconds, "skipped_shards": report.skipped,
                 "tokens_per_second": round(computed_tokens / report.seconds, 1) if report.computed else None,
                 "tokenizer": refs["tokenizer"]}
        store.commit(refs["tokens"], {**record, **stats}, expected_shards=n_shards)
        log.info("tokenize: %d tokens in %d shards (%d skipped), %s tokens/s", tokens, n_shards, report.skipped,
                 stats["tokens_per_second"])
    return refs


tokenize_task = stage_task(run_tokenize, "tokenize")
