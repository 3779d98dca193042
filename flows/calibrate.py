"""Machine calibration: a few seconds of fixed work whose speed lets wall-clock figures be compared.

Machines of the same size here differ ~2x in speed, so every timing in the README and bench/RESULTS.md
carries the calibration of the machine it came from: fp32 matmul GFLOP/s (1024 x 1024, all threads torch
uses, and one thread) and the tokens/s of a fixed byte-level BPE (trained on generated text with a fixed
seed, so every machine encodes the same work). `make test` prints it first; `tracecore calibrate` prints it.
"""

from __future__ import annotations

import random
import time

MATMUL_N = 1024
SECONDS = 0.7  # per measurement: long enough for a stable rate, short enough to stay in a few seconds in all


def _rate(work, seconds: float = SECONDS) -> tuple[int, float]:
    """Calls `work` repeatedly for `seconds` (after one warm-up call); returns (calls, elapsed)."""
    work()
    start, calls = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        work()
        calls += 1
    return calls, elapsed


def matmul_gflops(threads: int | None = None) -> float:
    """fp32 GFLOP/s of a 1024 x 1024 matmul with `threads` torch threads (None = torch's default)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(MATMUL_N, MATMUL_N, generator=gen) for _ in range(2))
        calls, elapsed = _rate(lambda: a @ b)
    finally:
        torch.set_num_threads(previous)
    return 2 * MATMUL_N ** 3 * calls / elapsed / 1e9


def _fixed_text(seed: int = 0, sentences: int = 4000) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 24))) + "." for _ in range(sentences)]


def tokenizer_tokens_per_second() -> float:
    """Tokens/s of `encode_batch` with a fixed byte-level BPE (vocab 2,000) on fixed generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = _fixed_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    counted = []
    calls, elapsed = _rate(lambda: counted.append(sum(len(e.ids) for e in tok.encode_batch(text))))
    return counted[-1] * calls / elapsed


def calibrate() -> dict:
    """The calibration dict; `load_1min` is the load average before measuring (a loaded machine reads
    slow)."""
    import os

    import torch

    load = round(os.getloadavg()[0], 2)
    return {"cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "matmul_gflops": round(matmul_gflops(), 1), "matmul_gflops_1thread": round(matmul_gflops(1), 1),
            "tokenizer_tokens_per_s": round(tokenizer_tokens_per_second()), "load_1min": load}


def calibration_line(c: dict | None = None) -> str:
    c = c or calibrate()
    return (f"calibration: fp32 matmul {c['matmul_gflops']:.0f} GFLOP/s ({c['torch_threads']} threads; "
            f"{c['matmul_gflops_1thread']:.0f} on 1), BPE {c['tokenizer_tokens_per_s'] / 1e3:.0f} k "
            f"tokens/s, "
            f"{c['cores']} cores, load {c['load_1min']:.1f} before")


if __name__ == "__main__":
    print(calibration_line())
