"""Benchmark: Mini-Sequence Transformer memory and speed, plain vs. chunked PyTorch vs. Triton.

    .venv/bin/python bench/mini_sequence.py [--quick]

Two tables, every cell measured in a fresh subprocess (so peak memory is not polluted by earlier cells):
1. LM head + cross-entropy (forward + backward) over sequence lengths and vocab sizes (hidden 1024):
   plain (full fp32 logits, `F.cross_entropy`, as HF's loss), chunked PyTorch (kernels.reference), and the
   Triton kernel path (CUDA only).
2. A full training step (forward + backward + AdamW) of a small Llama (hidden 256, 4 layers, MLP 1024,
   vocab 32k), batch 1: plain vs. `apply_mini_sequence`, plus the largest sequence length that fits a
   fixed budget (a linear fit of peak memory over the measured lengths, extrapolated).
Peak memory: CUDA `max_memory_allocated` above the inputs; CPU peak RSS above the inputs (ru_maxrss),
which includes allocator slack, so CPU ratios are conservative. Tokens/s: best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def head_cell(method: str, seq: int, vocab: int, device: str, repeats: int) -> dict:
    from kernels import lm_head_ce, plain_lm_head_ce
    from kernels.mini_sequence import auto_lm_chunks

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(seq, 1024, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, 1024, device=device, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (seq,), device=device)
    chunks = auto_lm_chunks(seq, vocab, 1024)  # what apply_mini_sequence picks: M = V / d, >= 256 rows
    if method == "plain":
        fn = plain_lm_head_ce
    elif method == "chunked":
        fn = lambda h, w, y: lm_head_ce(h, w, y, chunks)
    else:
        from kernels.lm_head_ce import triton_lm_head_ce

        fn = lambda h, w, y: triton_lm_head_ce(h, w, y, chunks)
    return timed(lambda: fn(hidden, weight, labels).backward(), device, repeats, seq)


def step_cell(method: str, seq: int, device: str, repeats: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernels import apply_mini_sequence

    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(seq, 2048))
    model = LlamaForCausalLM(config).to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    if method != "plain":
        apply_mini_sequence(model, use_triton=method == "triton")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (1, seq), device=device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)

    return timed(step, device, repeats, seq)


def current_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, device: str, repeats: int, tokens: int) -> dict:
    """Peak above the memory in use before the first call (which warms up and counts), best time after."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = current_mb(device)
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return {"peak_mb": max(peak_mb(device) - base, 0.0), "tokens_per_s": tokens / best}


def run_cell(args: list[str], timeout: int) -> dict | None:
    """One measurement in a fresh interpreter; None when it fails (out of memory) or times out."""
    try:
        out = subprocess.run([sys.executable, __file__, "--cell", *args], capture_output=True, text=True,
                             timeout=timeout, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return None


def fmt(cell: dict | None, base: dict | None) -> str:
    if cell is None:
        return "        failed/OOM        "
    ratio = f"{base['peak_mb'] / max(cell['peak_mb'], 1e-3):5.1f}x" if base else "   - "
    speed = f"{cell['tokens_per_s'] / base['tokens_per_s']:4.2f}" if base else "  - "
    return f"{cell['peak_mb']:8.0f} MB {ratio} {speed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer lengths (CI-sized machine)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-mb", type=float, default=None, help="memory budget for the max-length estimate")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cell:
        kind, method, *sizes = args.cell
        cell = (head_cell(method, int(sizes[0]), int(sizes[1]), device, args.repeats) if kind == "head"
                else step_cell(method, int(sizes[0]), device, args.repeats))
        print(json.dumps(cell))
        return
    methods = ["plain", "chunked"] + (["triton"] if device == "cuda" else [])
    gpu = device == "cuda"
    head_lengths = [2048, 8192, 32768, 65536] if gpu else [1024, 4096] if args.quick else [1024, 2048, 4096]
    step_lengths = ([4096, 16384, 32768, 65536] if gpu else [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096])
    name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; cells: peak MB above inputs, memory saving vs plain, "
          "speed vs plain (tokens/s ratio)\n")
    print("LM head + cross-entropy, forward + backward (hidden 1024)")
    print(f"{'vocab':>7} {'seq':>6} | " + " | ".join(f"{m:^26}" for m in methods))
    for vocab in (32000, 128256):
        for seq in head_lengths:
            cells = {m: run_cell(["head", m, str(seq), str(vocab)], 900) for m in methods}
            print(f"{vocab:>7} {seq:>6} | " + " | ".join(fmt(cells[m], cells["plain"] if m != "plain" else None)
                                                         for m in methods), flush=True)
    print("\nTraining step (Llama d=256, 4 layers, vocab 32k, batch 1, AdamW)")
    print(f"{'seq':>6} | " + " | ".join(f"{m:^26}" for m in methods))
    fits = {m: [] for m in methods}
    for seq in step_lengths:
        cells = {m: run_cell(["step", m, str(seq)], 900) for m in methods}
        for m, c in cells.items():
            if c:
                fits[m].append((seq, c["peak_mb"]))
        print(f"{seq:>6} | " + " | ".join(fmt(cells[m], cells["plain"] if m != "plain" else None) for m in methods),
              flush=True)
    budget = args.budget_mb or (40_000 if gpu else 8_000)
    print(f"\nLargest trainable sequence length within {budget:.0f} MB (linear fit of the step's peak, extrapolated):")
    for m, points in fits.items():
        if len(points) >= 2:
            (s0, p0), (s1, p1) = points[0], points[-1]
            slope = (p1 - p0) / (s1 - s0)
            print(f"  {m:8s} ~{int(s0 + (budget - p0) / slope) if slope > 0 else 'unbounded'} tokens "
                  f"({slope * 1024:.0f} MB per 1k tokens)")


if __name__ == "__main__":
    main()
