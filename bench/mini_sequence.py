"""Benchmark: Mini-Sequence Transformer memory and speed, plain vs. chunked PyTorch vs. Triton.

    .venv/bin/python bench/mini_sequence.py [--quick | --smoke] [--hidden 4096 --vocabs 128256
        --head-lengths 4096 16384 32768 65536 --step-model 1b --step-lengths 2048 8192 16384]

Two tables; on CPU every cell runs in a fresh subprocess (peak RSS only grows), on CUDA in this process with
the peak counter reset and memory freed between cells:
1. LM head + cross-entropy (forward + backward) over sequence lengths and vocab sizes (hidden `--hidden`,
   default 1024; Llama-3-8B's head is 4096 x 128,256): plain (full fp32 logits, `F.cross_entropy`, as HF's
   loss), chunked PyTorch (kernels.reference), the Triton kernel path (CUDA only) and Liger-Kernel's fused
   linear cross-entropy (CUDA, when the `liger-kernel` package is installed; the table says when it is not).
2. A full training step (forward + backward + AdamW) of a Llama (`--step-model`: small = hidden 256,
   4 layers, vocab 32k; 1b = hidden 2048, 16 layers, vocab 128k, ~1.2 B parameters; toy for --smoke),
   batch 1: plain vs. activation checkpointing alone vs. `apply_mini_sequence` (which includes checkpointing,
   as the paper's MsT does), plus the largest sequence length that fits a fixed budget (a linear fit of the
   step's memory over the measured lengths, extrapolated; on CUDA the total allocated: weights, gradients,
   AdamW state, activations). On CUDA the model is bf16 with bf16 AdamW state.
Peak memory: CUDA `max_memory_allocated` above the inputs; CPU peak RSS above the inputs (ru_maxrss),
which includes allocator slack, so CPU ratios are conservative. Tokens/s: best of `--repeats`.
"""

from __future__ import annotations

import argparse
import gc
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


STEP_MODELS = {  # --step-model: Llama shapes for the training-step table
    "toy": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4},
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8},
    "toy-neox": {"model_type": "gpt_neox", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4},
    # Pythia-410m's shape (GPT-NeoX), the memorization paper's family: MsT on a non-Llama architecture
    "pythia-410m": {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 1024,
                    "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
}


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def head_cell(method: str, seq: int, vocab: int, device: str, repeats: int, d: int = 1024) -> dict:
    from tracecore.kernels.mini_sequence import auto_lm_chunks
    from tracecore.kernels.reference import lm_head_ce, plain_lm_head_ce

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(seq, d, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, d, device=device, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (seq,), device=device)
    chunks = auto_lm_chunks(seq, vocab, d)  # what apply_mini_sequence picks: M = V / d, >= 256 rows
    if method == "plain":
        fn = plain_lm_head_ce
    elif method == "chunked":
        def fn(h, w, y):
            return lm_head_ce(h, w, y, chunks)
    elif method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        def fn(h, w, y):
            return liger(w, h, y)
    else:
        from tracecore.kernels.triton_ce import triton_lm_head_ce

        def fn(h, w, y):
            return triton_lm_head_ce(h, w, y, chunks)
    return timed(lambda: fn(hidden, weight, labels).backward(), device, repeats, seq)


def ce_sweep(rows: int, vocab: int, repeats: int = 20) -> None:
    """Time the fused CE kernel alone on bf16 logits over tile widths and warp counts (CUDA), beside the
    default `launch_shape` picks and the PyTorch reference step: evidence for that heuristic."""
    from tracecore.kernels.reference import torch_ce_grad_
    from tracecore.kernels.triton_ce import launch_shape, triton_ce_grad_

    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device="cuda")

    def ms(fn) -> float:
        fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / repeats

    gbytes = 3 * rows * vocab * 2 / 1e9  # two reads and one write of bf16 logits
    default = launch_shape(vocab)
    print(f"fused CE kernel alone, {rows} rows x {vocab} bf16 logits (default BLOCK {default[0]}, "
          f"{default[1]} warps)")
    print(f"{'BLOCK':>6} {'warps':>5} | {'ms':>7} | {'GB/s':>6}")
    for block in (4096, 8192, 16384, 32768):
        for warps in (4, 8, 16, 32):
            t = ms(lambda b=block, w=warps: triton_ce_grad_(logits, labels, 1.0, b, w))
            print(f"{block:>6} {warps:>5} | {t:7.3f} | {gbytes / t * 1e3:6.0f}"
                  + ("  <- default" if (block, warps) == default else ""))
    fp32 = logits.float()
    print(f"PyTorch reference step on fp32 logits: {ms(lambda: torch_ce_grad_(fp32, labels, 1.0)):.3f} ms\n",
          flush=True)


def step_cell(method: str, seq: int, device: str, repeats: int, size: str = "small") -> dict:
    from tracecore.kernels.mini_sequence import _enable_checkpointing, apply_mini_sequence
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(STEP_MODELS[size])
    config = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape,
                                  max_position_embeddings=max(seq, 2048))
    vocab = shape["vocab_size"]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 1.2 B model's CPU init alone takes tens of seconds
        model = AutoModelForCausalLM.from_config(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    if method == "checkpointing":  # activation recomputation alone, the paper's second baseline
        _enable_checkpointing(model)
    elif method != "plain":
        apply_mini_sequence(model, use_triton=method == "triton")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (1, seq), device=device)

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
    return {"peak_mb": max(peak_mb(device) - base, 0.0), "total_mb": peak_mb(device),
            "tokens_per_s": tokens / best}


def run_cell(args: list[str], timeout: int, in_process: bool = False) -> dict | None:
    """One measurement; None when it fails (out of memory) or times out. CPU: in a fresh interpreter, since
    peak RSS only grows. `in_process` (CUDA, whose peak counter resets, and --smoke): in this interpreter,
    memory freed between cells; saves the ~10 s start of a CUDA interpreter per cell."""
    if in_process:
        kind, method, *sizes = args[: args.index("--repeats")] if "--repeats" in args else args
        repeats = int(args[args.index("--repeats") + 1]) if "--repeats" in args else 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return (head_cell(method, int(sizes[0]), int(sizes[1]), device, repeats, int(sizes[2]))
                    if kind == "head"
                    else step_cell(method, int(sizes[0]), device, repeats, sizes[1]))
        except torch.OutOfMemoryError:
            return None
        finally:
            release(device)
    try:
        out = subprocess.run([sys.executable, __file__, "--cell", *args], capture_output=True, text=True,
                             timeout=timeout, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return None


def release(device: str) -> None:
    """Free what the last in-process cell left (checkpointing hooks hold reference cycles)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def fmt(cell: dict | None, base: dict | None) -> str:
    if cell is None:
        return "        failed/OOM        "
    ratio = f"{base['peak_mb'] / max(cell['peak_mb'], 1e-3):5.1f}x" if base else "   - "
    speed = f"{cell['tokens_per_s'] / base['tokens_per_s']:4.2f}" if base else "  - "
    return f"{cell['peak_mb']:8.0f} MB {ratio} {speed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer lengths (CI-sized machine)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes that finish in seconds on a CPU (CI)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024, help="LM-head input width (Llama-3-8B: 4096)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--head-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--step-model", choices=sorted(STEP_MODELS), default="small")
    parser.add_argument("--step-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--mst-lengths", type=int, nargs="*", default=[],
                        help="extra step lengths for the MsT column only (where plain no longer fits)")
    parser.add_argument("--cell-timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--budget-mb", type=float, default=None,
                        help="memory budget for the max-length estimate")
    parser.add_argument("--no-step", action="store_true", help="the LM-head table only")
    parser.add_argument("--ce-sweep", type=int, nargs=2, metavar=("ROWS", "VOCAB"),
                        help="CUDA: time the fused CE kernel alone over tile widths / warp counts, then exit")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.ce_sweep:
        if device != "cuda":
            print("--ce-sweep needs CUDA: skipped")
        else:
            ce_sweep(*args.ce_sweep)
        return
    if args.cell:
        kind, method, *sizes = args.cell
        cell = (head_cell(method, int(sizes[0]), int(sizes[1]), device, args.repeats, int(sizes[2]))
                if kind == "head"
                else step_cell(method, int(sizes[0]), device, args.repeats, sizes[1]))
        print(json.dumps(cell))
        return
    gpu = device == "cuda"
    in_process = gpu or args.smoke
    if args.smoke:
        args.hidden, args.vocabs, args.repeats = 64, [1000], 1
        args.step_model = "toy" if args.step_model == "small" else args.step_model
    head_methods = ["plain", "chunked"] + (["triton"] if gpu else []) + (["liger"] if gpu
                                                                         and liger_available() else [])
    head_lengths = args.head_lengths or ([128, 256] if args.smoke else [2048, 8192, 32768, 65536] if gpu
                                         else [1024, 4096] if args.quick else [1024, 2048, 4096])
    step_lengths = args.step_lengths or ([64, 128] if args.smoke else [4096, 16384, 32768, 65536] if gpu
                                         else [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096])
    name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; cells: peak MB above inputs, memory saving vs plain, "
          "speed vs plain (tokens/s ratio)")
    if gpu and not liger_available():
        print("Liger-Kernel: not installed here (`pip install liger-kernel`), so its column is left out")
    print(f"\nLM head + cross-entropy, forward + backward (hidden {args.hidden})")
    print(f"{'vocab':>7} {'seq':>6} | " + " | ".join(f"{m:^26}" for m in head_methods))
    for vocab in args.vocabs:
        for seq in head_lengths:
            cells = {m: run_cell(["head", m, str(seq), str(vocab), str(args.hidden), "--repeats",
                                  str(args.repeats)],
                                 args.cell_timeout, in_process) for m in head_methods}
            print(f"{vocab:>7} {seq:>6} | "
                  + " | ".join(fmt(cells[m], cells["plain"] if m != "plain" else None)
                                                         for m in head_methods), flush=True)
    if args.no_step:
        return
    step_methods = ["plain", "checkpointing", "chunked"] + (["triton"] if gpu else [])
    shape = STEP_MODELS[args.step_model]
    print(f"\nTraining step ({shape.get('model_type', 'llama')} {args.step_model}: d={shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, "
          f"vocab {shape['vocab_size']}, batch 1, AdamW)")
    print(f"{'seq':>6} | " + " | ".join(f"{m:^26}" for m in step_methods))
    fits = {m: [] for m in step_methods}
    mst = step_methods[-1]  # the Triton path on CUDA, chunked PyTorch elsewhere
    for seq in step_lengths + args.mst_lengths:
        methods = step_methods if seq in step_lengths else [mst]
        cells = {m: run_cell(["step", m, str(seq), args.step_model, "--repeats", str(args.repeats)],
                             args.cell_timeout, in_process) for m in methods}
        for m, c in cells.items():
            if c:  # CUDA: everything allocated (weights, gradients, AdamW state); CPU: RSS above the inputs
                fits[m].append((seq, c["total_mb"] if gpu else c["peak_mb"]))
        print(f"{seq:>6} | " + " | ".join(fmt(cells[m], cells.get("plain") if m != "plain" else None)
                                          if m in cells else f"{'-':^26}"
                                          for m in step_methods), flush=True)
    budget = args.budget_mb or (40_000 if gpu else 8_000)
    print(f"\nLongest trainable sequence within {budget:.0f} MB of "
          f"{'total allocated' if gpu else 'peak above inputs'} "
          "memory ('chunked'/'triton' = MsT, which includes checkpointing), linear between the two measured "
          "lengths that bracket the budget, else from the last two:")
    for m, points in fits.items():
        print(f"  {m:13s} {max_length(points, budget)}")


def max_length(points: list[tuple[int, float]], budget: float) -> str:
    """Sequence length at which the step's memory reaches `budget`, from measured (length, MB) points."""
    if len(points) < 2:
        return "not enough measured lengths"
    above = [i for i, (_, mb) in enumerate(points) if mb > budget]
    i = max(1, above[0]) if above else len(points) - 1
    (s0, p0), (s1, p1) = points[i - 1], points[i]
    slope = (p1 - p0) / (s1 - s0)
    shown = "; ".join(f"{s // 1024}k: {mb / 1024:.1f} GB" for s, mb in points)
    if slope * 1024 < 1:  # < 1 MB per 1k tokens: the optimizer's peak hides the activations, no fit
        return f"> {s1:,} tokens (memory flat over the measured lengths: {shown})"
    kind = "interpolated" if above else "extrapolated"
    return (f"~{int(s0 + (budget - p0) / slope):,} tokens ({kind}; {slope * 1024:.0f} MB per 1k tokens; "
            f"{shown})")

if __name__ == "__main__":
    main()
