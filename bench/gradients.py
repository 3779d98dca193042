"""Benchmark: per-sample gradient features, batched (hooks) vs. a batch-size-1 loop, and the projection.

    .venv/bin/python bench/gradients.py [--records 256] [--batch 32]

Model: the tiny profile's Llama shape (hidden 192, 3 layers, vocab 4096, LoRA r 8 on q/k/v/o, 32k
LoRA parameters), randomly initialized (throughput does not depend on the weights); records: the sample
world's instructions, max 128 tokens. Both paths compute the same exact gradients (checked here); times are best of 3. The loop is the naive
baseline: the model's own loss per record (full logits); the batched path also runs the LM head only on
response positions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from configs.schema import GradientsConfig, PretrainConfig, SampleConfig
from tasks.gradients import batched_grads, collate, encode, load_pool, loop_grads, lora_model, project
from tasks.pretrain import build_model
from tasks.sample import write_sample
from tasks.tokenize import train_bpe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_sample(SampleConfig(filler_documents=500, corpus_files=1), f"{tmp}/world")
        import gzip
        import json

        texts = [json.loads(x)["text"] for f in Path(f"{tmp}/world/corpus").glob("*.gz")
                 for x in gzip.decompress(f.read_bytes()).splitlines()]
        train_bpe(texts, 4096, 2, Path(f"{tmp}/model"))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(f"{tmp}/model")
        pcfg = PretrainConfig(hidden_size=192, layers=3, heads=6, kv_heads=3, intermediate_size=512)
        build_model(pcfg, len(tok), tok.eos_token_id, tok.pad_token_id).save_pretrained(f"{tmp}/model")
        cfg = GradientsConfig(lora_r=8, lora_alpha=32, max_seq_len=128)
        tok, model = lora_model(f"{tmp}/model", cfg)
        records, _ = load_pool(f"{tmp}/world/instructions/train.jsonl")
    model.eval()
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.normal_(0, 0.02)
    data = sorted((encode(tok, r, cfg.max_seq_len) for r in records[: args.records]), key=lambda d: len(d[0]))
    batches = [collate(data[i:i + args.batch], tok.pad_token_id) for i in range(0, len(data), args.batch)]
    batched_grads(model, batches[0])  # warm-up

    def best_of_3(fn):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = torch.cat([fn(model, b) for b in batches])
            times.append(time.perf_counter() - start)
        return out, min(times)

    fast, t_batched = best_of_3(batched_grads)
    slow, t_loop = best_of_3(loop_grads)
    err = (fast - slow).abs().max().item()
    print(f"\nper-sample LoRA gradients, {len(data)} records, {fast.shape[1]:,} LoRA parameters, "
          f"{torch.get_num_threads()} torch threads (max |batched - loop| = {err:.1e})")
    print("| method                      | seconds | records/s | vs loop |")
    print("|-----------------------------|---------|-----------|---------|")
    for name, t in ((f"batched hooks (batch {args.batch})", t_batched), ("batch-size-1 loop", t_loop)):
        print(f"| {name:<27} | {t:>7.2f} | {len(data) / t:>9.1f} | {t_loop / t:>6.2f}x |")
    print("\n| projection (blocked Rademacher) | dim  | seconds | records/s |")
    print("|---------------------------------|------|---------|-----------|")
    for dim in (512, 8192):
        start = time.perf_counter()
        project(fast, dim, 0)
        t = time.perf_counter() - start
        print(f"| {fast.shape[1]:,} -> {dim:<22} | {dim:>4} | {t:>7.2f} | {len(data) / t:>9.0f} |")


if __name__ == "__main__":
    main()
