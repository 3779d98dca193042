"""Benchmark: per-sample gradient features, batched (hooks) vs. a batch-size-1 loop, and the projection.

    .venv/bin/python bench/gradients.py [--records 256] [--batch 32]
    python bench/gradients.py --synthetic --hidden 768 --layers 12 --vocab 32000 --lora-r 128 --seq 256   #
    GPU

Model: the tiny profile's Llama shape (hidden 192, 3 layers, vocab 4096, LoRA r 8 on q/k/v/o, 32k
LoRA parameters), randomly initialized (throughput does not depend on the weights); records: the sample
world's instructions, max 128 tokens. `--synthetic` needs only PyTorch, transformers and peft (no pipeline
imports, for a GPU machine): a random Llama of the given shape (768 x 12 layers x 32k vocab is ~110 M
parameters) and random records of `--seq` tokens whose second half is the response. Both paths compute the
same exact gradients (checked here); times are best of 3. The loop is the naive
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
from tracecore.kernels.per_sample import batched_grads, loop_grads


def sample_world_batches(args) -> tuple[object, list, int]:
    """The tiny profile's shape and tokenizer, the sample world's instructions."""
    import gzip
    import json

    from tracecore.configs.schema import GradientsConfig, PretrainConfig, SampleConfig
    from tracecore.tasks.gradients import lora_model
    from tracecore.tasks.instructions import collate, encode, load_pool
    from tracecore.tasks.lm_training import build_model
    from tracecore.tasks.tokenize import train_bpe
    from tracecore.tasks.world import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        write_sample(SampleConfig(filler_documents=500, corpus_files=1), f"{tmp}/world")
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
    data = sorted((encode(tok, r, cfg.max_seq_len) for r in records[: args.records]), key=lambda d: len(d[0]))
    return model, [collate(data[i:i + args.batch], tok.pad_token_id)
                   for i in range(0, len(data), args.batch)], len(data)


def synthetic_batches(args) -> tuple[object, list, int]:
    """A random Llama of the requested shape with LoRA on q/k/v/o, and random `--seq`-token records."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=max(2048, args.seq))
    lora = LoraConfig(r=args.lora_r, lora_alpha=4 * args.lora_r,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM(config), lora).to(args.device)
    ids = torch.randint(3, args.vocab, (args.records, args.seq), device=args.device)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half carries no loss
    mask = torch.ones_like(ids)
    batches = [(ids[i:i + args.batch], labels[i:i + args.batch], mask[i:i + args.batch])
               for i in range(0, args.records, args.batch)]
    return model, batches, args.records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--synthetic", action="store_true", help="random Llama + random records (torch only)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--loop-records", type=int, default=None,
                        help="time the loop on this many records only "
                        "(it is the slow side); default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, batches, n = synthetic_batches(args) if args.synthetic else sample_world_batches(args)
    model.eval()
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    batched_grads(model, batches[0])  # warm-up
    loop_batches = batches if args.loop_records is None else batches[: max(1,
                                                                           args.loop_records // args.batch)]

    def best_of_3(fn, which, keep):
        """Best wall time of 3 passes; the gradients of the first `keep` batches stay (on the device: a
        9 M-wide row per record is 10 GB for 256 records, and copying it to the host was the whole cost)."""
        times = []
        for _ in range(3):
            sync(args.device)
            start = time.perf_counter()
            out = []
            for i, b in enumerate(which):
                grads = fn(model, b)
                if i < keep:
                    out.append(grads)
            sync(args.device)
            times.append(time.perf_counter() - start)
        return torch.cat(out), min(times)

    fast, t_batched = best_of_3(batched_grads, batches, len(loop_batches))
    slow, t_loop = best_of_3(loop_grads, loop_batches, len(loop_batches))
    err = (fast - slow).abs().max().item()
    rate_fast, rate_loop = n / t_batched, len(slow) / t_loop
    print(f"\nper-sample LoRA gradients on {args.device}, {n} records, {n_params / 1e6:.1f} M parameters, "
          f"{fast.shape[1]:,} LoRA parameters, {torch.get_num_threads()} torch threads "
          f"(max |batched - loop| = {err:.1e} on {len(slow)} records)")
    print("| method                      | records/s | vs loop |")
    print("|-----------------------------|-----------|---------|")
    for name, rate in ((f"batched hooks (batch {args.batch})", rate_fast), ("batch-size-1 loop", rate_loop)):
        print(f"| {name:<27} | {rate:>9.1f} | {rate / rate_loop:>6.2f}x |")
    if not args.synthetic:
        from tracecore.tasks.gradients import project

        print("\n| projection (blocked Rademacher) | dim  | seconds | records/s |")
        print("|---------------------------------|------|---------|-----------|")
        for dim in (512, 8192):
            start = time.perf_counter()
            project(fast, dim, 0)
            t = time.perf_counter() - start
            print(f"| {fast.shape[1]:,} -> {dim:<22} | {dim:>4} | {t:>7.2f} | {n / t:>9.0f} |")


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
