"""Benchmark: decoding with full attention vs. RazorAttention vs. LongCache over context lengths.

    .venv/bin/python bench/long_context.py [--lengths 1024 2048 4096 8192] [--decode 32] python
    bench/long_context.py --hidden 1024 --layers 4 --heads 16 --kv-heads 8 --lengths 8192 32768 65536 # GPU
    python bench/long_context.py --hidden 1024 --layers 4 --heads 16 --kv-heads 8 --lengths 32768 65536 \
        --batch 1 16 64 --methods full razor --synthetic-cache  # GPU: decode speed where the cache read
        dominates

Model: a random Llama (default hidden 256, 4 layers, 8 query / 4 KV heads, vocab 8k) in fp32 (bf16 on CUDA);
speed does not depend on the weights. Per length: prefill the context with the policy (LongCache in 512-token
chunks), then decode `--decode` tokens one at a time. Reported: decode tokens/s, the KV cache bytes the policy
holds after decoding (all `--batch` sequences), and both as ratios to full attention. RazorAttention uses the
heads with the top 14 % induction / 1 % echo scores from the probe, S0 = 256, C = 8, 4 sinks; LongCache uses
32 sinks, a 1024-token local window, top-1 spans of 32, recall clip 16 (scope 1568 tokens). All three run
through `kernels.decoding.forward`, so the comparison isolates the cache policy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tracecore.kernels.decoding import FullAttention, Growing, forward, prefill
from tracecore.kernels.longcache import LongCache, LongCacheConfig
from tracecore.kernels.razor import RazorCache, RazorConfig, head_scores, retrieval_heads


def build_model(device: str, hidden: int = 256, layers: int = 4, heads: int = 8, kv_heads: int = 4,
                max_len: int = 65536):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_len, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval().to(device)
    return model.to(torch.bfloat16) if device == "cuda" else model


def fill_cache(model, policy, batch: int, length: int) -> torch.Tensor:
    """`--synthetic-cache`: random rotated keys/values in place of a prefill (decode speed does not depend on
    the cache's values, and a real prefill of 64 x 64k tokens costs minutes); full attention and Razor only.
    Returns the next input token."""
    cfg, device, dtype = model.config, model.device, model.dtype
    full = policy.prefill if isinstance(policy, RazorCache) else policy
    if not isinstance(full, FullAttention):
        raise SystemExit("--synthetic-cache: full attention and RazorAttention only (LongCache re-positions "
                         "its keys)")
    room = length + 256  # the decoded tokens fit: no regrowth (a 2x transient at 32 GB) while decoding
    shape = (batch, cfg.num_key_value_heads, room, cfg.hidden_size // cfg.num_attention_heads)
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
        full.cache[layer] = (Growing(k, 2, length), Growing(v, 2, length),
                             Growing(torch.arange(room, device=device), 0, length))
    return torch.randint(10, cfg.vocab_size, (batch, 1), device=device)


def decode_rate(model, policy, context: torch.Tensor, steps: int, chunk: int, warmup: int = 2,
                synthetic: bool = False) -> tuple[float, int]:
    """Decode tokens/s after `warmup` untimed tokens (Triton compiles its kernels on the first call)."""
    if synthetic:
        token = fill_cache(model, policy, *context.shape)
    else:
        token = prefill(model, context, policy, chunk)[:, -1:].argmax(-1)
    if hasattr(policy, "after_prefill"):
        policy.after_prefill()
    for i in range(warmup):
        token = forward(model, token, policy, context.shape[1] + i)[:, -1:].argmax(-1)
    if context.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        token = forward(model, token, policy, context.shape[1] + i)[:, -1:].argmax(-1)
    if context.is_cuda:
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start), policy.cache_bytes()


def release(device: str) -> None:
    """Free the last policy's cache before the next one is built (a 64 x 64k cache is 32 GB)."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="sequences decoded together (one table row per value): at batch 1 a small "
                             "model's decode step is bound by kernel launches, with many sequences by "
                             "reading the KV cache, the cost Razor cuts")
    parser.add_argument("--synthetic-cache", action="store_true",
                        help="random KV caches instead of prefilling the context "
                         "(speed only; full and razor)")
    parser.add_argument("--methods", nargs="+", default=["full", "razor", "longcache"],
                        choices=["full", "razor", "longcache"])
    parser.add_argument("--smoke", action="store_true", help="toy sizes that finish in seconds on a CPU (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 4, 2
        args.lengths, args.decode = [512, 1024], 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
             "max_len": max(65536, max(args.lengths) + args.decode + 2)}
    model = build_model("cpu", **shape)
    induction, echo = head_scores(model.float(), block=256, repeats=4, low=10, high=8192)
    model = build_model(device, **shape)
    razor_cfg = RazorConfig(min_buffer=256, compression=8, sinks=4)
    heads = retrieval_heads(induction, echo, razor_cfg)
    lc_cfg = LongCacheConfig(global_size=32, local_size=1024, mid_size=1, span_size=32, recall_clip=16)
    makers = {"full": lambda: FullAttention(model), "razor": lambda: RazorCache(model, heads, razor_cfg),
              "longcache": lambda: LongCache(model, lc_cfg)}
    # full first: the base
    makers = {m: makers[m] for m in ["full"] + [m for m in args.methods if m != "full"]}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; model d={args.hidden}, {args.layers} layers, {args.heads} query / "
          f"{args.kv_heads} KV heads; "
          f"retrieval heads {int(heads.sum())}/{heads.numel()}; decode {args.decode} tokens; "
          f"{'synthetic (random) caches' if args.synthetic_cache else 'prefilled caches'}; "
          "Razor attention: "
          f"{'Triton biased attention' if device == 'cuda' else 'PyTorch reference'}\n")
    print(f"{'context':>8} | {'batch':>5} | {'method':9} | {'tokens/s':>9} | {'KV MB':>8} | "
          f"{'speed vs full':>13} | "
          f"{'KV vs full':>10}")
    for length in args.lengths:
        for batch in args.batch:
            context = torch.randint(10, 8192, (batch, length), device=device)
            base = None
            for name, make in makers.items():
                rate, kv = decode_rate(model, make(), context, args.decode, 512,
                                       synthetic=args.synthetic_cache)
                rate *= batch  # tokens/s over all sequences
                base = base or (rate, kv)
                print(f"{length:>8} | {batch:>5} | {name:9} | {rate:9.1f} | {kv / 2**20:8.1f} | "
                      f"{rate / base[0]:12.2f}x | "
                      f"{kv / base[1]:9.2f}x", flush=True)
                release(device)


if __name__ == "__main__":
    main()
