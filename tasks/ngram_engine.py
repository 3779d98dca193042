"""Querying an infini-gram index the `ngram` stage built: the engine over all its shard groups, and the
paired-symbol encoding of ids above u16 (`PairedEngine`). A library module, so memorization and trace query
the index without importing the stage that builds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tracecore.storage.store import ArtifactStore


class VocabMismatchError(ValueError):
    pass


HALF = 32_767  # paired symbols: lo = id % HALF in [0, HALF), hi = HALF + id // HALF in [HALF, 65535)
MAX_PAIRED_ID = HALF * (0xFFFF - HALF) - 1


def token_dtype(bits: int) -> str:
    return {16: "u16", 32: "u32"}[bits]


def to_symbols(ids: np.ndarray) -> np.ndarray:
    """u32 ids -> u16 symbols, two per id (hi, lo). hi and lo come from disjoint ranges, so a match of an
    encoded query can only start at a hi symbol, i.e. on a token boundary: counts stay exact."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty(2 * len(ids), np.uint16)
    out[0::2], out[1::2] = HALF + ids // HALF, ids % HALF
    return out


class PairedEngine:
    """The engine API tracecore uses (`count`, `count_cnf`, `infgram_prob`) over an index of paired
    symbols."""

    def __init__(self, engine):
        self.engine = engine

    def encode(self, ids) -> list[int]:
        """Token ids -> the index's symbols (what the raw engine's `find` and ranks work in)."""
        return to_symbols(ids).tolist()

    def count(self, input_ids) -> dict:
        return self.engine.count(self.encode(input_ids))

    def count_cnf(self, cnf, max_clause_freq=None, max_diff_tokens=None) -> dict:
        diff = None if max_diff_tokens is None else 2 * max_diff_tokens  # two symbols per token
        return self.engine.count_cnf([[self.encode(t) for t in clause] for clause in cnf], max_clause_freq,
                                     diff)

    def infgram_prob(self, prompt_ids, cont_id: int) -> dict:
        """cnt(s + t) / cnt(s) for the longest suffix s of the prompt that occurs (infini-gram's definition);
        a count is monotone in the suffix length, so the longest one is found by bisection."""
        lo, hi = 0, len(prompt_ids)  # suffix length lo is known to occur (the empty one always does)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.count(prompt_ids[len(prompt_ids) - mid:])["count"] else (lo, mid - 1)
        suffix = list(prompt_ids[len(prompt_ids) - lo:])
        prompt_cnt = self.count(suffix)["count"] if suffix else self.engine.count([])["count"] // 2
        cont_cnt = self.count(suffix + [cont_id])["count"]
        return {"prompt_cnt": prompt_cnt, "cont_cnt": cont_cnt, "prob": cont_cnt / max(prompt_cnt, 1),
                "suffix_len": lo}


@contextlib.contextmanager
def open_engine(store: ArtifactStore, index_ref: str, max_clause_freq: int = 50_000,
                max_diff_tokens: int = 100) -> Iterator:
    """An `InfiniGramEngine` over every shard group of the index (memory-mapped from local files)."""
    from infini_gram.engine import InfiniGramEngine

    manifest = store.manifest(index_ref)
    with store.local_dir(index_ref) as folder:
        dirs = sorted(str(p) for p in Path(folder).glob("group-*"))
        paired = manifest.get("token_dtype", "u16") == "u32"
        eos = manifest["eos_token_id"]
        engine = InfiniGramEngine(index_dir=dirs, eos_token_id=to_symbols([eos])[0].item() if paired else eos,
                                  vocab_size=65535, version=4, token_dtype="u16",
                                  max_clause_freq=max_clause_freq,
                                  max_diff_tokens=2 * max_diff_tokens if paired else max_diff_tokens)
        yield PairedEngine(engine) if paired else engine
