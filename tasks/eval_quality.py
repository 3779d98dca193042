"""Model quality of one checkpoint, as the eval stage measures it (one Dask task per checkpoint).

Held-out corpus perplexity, QA exact match, multiple-choice accuracy (highest mean per-token log-prob of a
choice, lm-eval's length-normalised convention), translation chrF (sacrebleu, greedy decoding), held-out
instruction loss and exact match per family, all in the fine-tuning template. A library module of `eval`
(fingerprinted with it), apart so the stage module reads top to bottom.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.instructions import TEMPLATE, collate, encode, load_pool
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, log_dropped, set_torch_threads
from tracecore.tasks.text import instruction_key, normalize_text

if TYPE_CHECKING:  # the type only: the stage's config is not code this library runs
    from tracecore.tasks.eval import EvalConfig

METRICS = ["perplexity", "qa_accuracy", "mc_accuracy", "translation_chrf", "instruction_loss",
           "instruction_accuracy"]


# ---- per-checkpoint quality ---------------------------------------------------------------------------
def prompt_ids(tok, instruction: str, text: str) -> list[int]:
    return tok(TEMPLATE.format(instruction=instruction, input=text), add_special_tokens=False)["input_ids"]


def continuation_logprobs(model, tok, pairs: list[tuple[list[int], list[int]]], batch_size: int):
    """(summed log-prob of each continuation, whether greedy decoding reproduces it exactly)."""
    import torch

    out = []
    for i in range(0, len(pairs), batch_size):
        batch = [(p + c, [-100] * len(p) + c) for p, c in pairs[i:i + batch_size]]
        ids, labels, mask = collate(batch, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        keep = target != -100
        logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        hits = (logits.argmax(-1) == target) | ~keep
        out += [(float((logp[b] * keep[b]).sum()), bool(hits[b].all()), int(keep[b].sum()))
                for b in range(len(batch))]
    return out


def mc_pick(scored: list[tuple[float, bool, int]]) -> int:
    """The choice with the highest mean per-token log-prob: a summed log-prob favours the shortest choice."""
    return int(np.argmax([logp / max(tokens, 1) for logp, _, tokens in scored]))


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, response) of an encoded record: the prompt is where labels are -100."""
    n = labels.count(-100)
    return ids[:n], ids[n:]


def generate(model, tok, prompts: list[list[int]], max_new: int, min_new: int = 0) -> list[str]:
    """Greedy continuations (`min_new`: tokens before an end-of-sequence may stop one)."""
    import torch

    texts = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, min_new_tokens=min_new,
                                 do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        texts.append(tok.decode(ids[0, len(p):], skip_special_tokens=True).strip())
    return texts


def quality_metrics(model, tok, tasks: dict[str, list[dict]], held_out: list[dict], blocks,
                    cfg: EvalConfig) -> dict:
    import sacrebleu
    from tracecore.tasks.lm_training import eval_loss

    eos = [tok.eos_token_id]
    qa = continuation_logprobs(model, tok, [(prompt_ids(tok, "Answer the question.", r["question"]),
                                             tok(r["answer"], add_special_tokens=False)["input_ids"] + eos)
                                            for r in tasks["qa"]], cfg.batch_size)
    mc_hits = []
    for r in tasks["multiple_choice"]:
        p = prompt_ids(tok, "Answer the question.", r["question"])
        scores = continuation_logprobs(model, tok, [(p, tok(c, add_special_tokens=False)["input_ids"] + eos)
                                                    for c in r["choices"]], cfg.batch_size)
        mc_hits.append(mc_pick(scores) == r["answer"])
    translations = generate(model, tok,
                            [prompt_ids(tok, "Translate the phrase from English to Zelan.", r["source"])
                                         for r in tasks["translation"]], 16)
    per = continuation_logprobs(model, tok, [split_prompt(*encode(tok, r, 256)) for r in held_out],
                                cfg.batch_size)
    families: dict[str, list[tuple]] = {}
    for r, scored in zip(held_out, per):
        families.setdefault(r.get("family", "all"), []).append(scored)
    return {"perplexity": math.exp(min(eval_loss(model, blocks, cfg.batch_size, "cpu"), 50)),
            "qa_accuracy": float(np.mean([h for _, h, _ in qa])), "mc_accuracy": float(np.mean(mc_hits)),
            "mc_chance": float(np.mean([1 / len(r["choices"]) for r in tasks["multiple_choice"]])),
            "translation_chrf": sacrebleu.corpus_chrf(translations,
                                                      [[r["target"] for r in tasks["translation"]]]).score,
            "instruction_loss": -sum(lp for lp, _, _ in per) / max(sum(n for _, _, n in per), 1),
            "instruction_accuracy": float(np.mean([h for _, h, _ in per])),
            "family_accuracy": json.dumps({f: float(np.mean([h for _, h, _ in v]))
                                           for f, v in sorted(families.items())}),
            "family_loss": json.dumps({f: -sum(lp for lp, _, _ in v) / max(sum(n for _, _, n in v), 1)
                                       for f, v in sorted(families.items())})}


def load_tasks(sample_dir: str, max_items: int, pool: list[dict]) -> dict[str, list[dict]]:
    """Evaluation items spread over frequencies, without any whose question or source text is an input of the
    fine-tuning pool (normalized): a fine-tuned model must not be scored on what it was trained on."""
    import fsspec

    seen = {normalize_text(r["input"]) for r in pool} | {normalize_text(r["instruction"]) for r in pool}
    tasks = {}
    for name, field in (("qa", "question"), ("multiple_choice", "question"), ("translation", "source")):
        with fsspec.open(f"{sample_dir}/tasks/{name}.jsonl", "rt") as fh:
            every = list(map(json.loads, filter(str.strip, fh)))
        rows = [r for r in every if normalize_text(r[field]) not in seen]
        log_dropped("eval", f"{name} items", len(every),
                    {"whose text is in the fine-tuning pool": len(every) - len(rows)})
        tasks[name] = rows[:: max(1, len(rows) // max_items)][:max_items]
    return tasks


def held_out_instructions(sample_dir: str, pool: list[dict]) -> list[dict]:
    """The sample world's held-out instructions without any whose identity is in the fine-tuning pool."""
    seen = {instruction_key(r) for r in pool}
    every = load_pool(f"{sample_dir}/instructions/eval.jsonl")[0]
    held_out = [r for r in every if instruction_key(r) not in seen]
    log_dropped("eval", "held-out instructions", len(every),
                {"also in the fine-tuning pool": len(every) - len(held_out)})
    return held_out


def load_checkpoint(store: ArtifactStore, model_ref: str) -> tuple:
    """(tokenizer, model in eval mode) of a checkpoint artifact: one loading rule for every eval pass."""
    from tracecore.tasks.models import model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with model_dir(store, model_ref) as folder, MODEL_LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                     trust_remote_code=False).eval()
    return tok, model


def evaluate_checkpoint(store_uri: str, ref: str, shard: int, item: dict, cfg: EvalConfig) -> dict:
    from tracecore.tasks.lm_training import split_blocks, token_stream

    set_torch_threads(cfg.threads)
    store = ArtifactStore(store_uri)
    tok, model = load_checkpoint(store, item["model_ref"])
    sample_dir = store.files_path(item["sample_ref"])
    pool = load_pool(item["pool_path"])[0]
    held_out = held_out_instructions(sample_dir, pool)
    _, blocks = split_blocks(token_stream(store, item["tokens_ref"], [tok.eos_token_id]), item["seq_len"],
                             item["eval_fraction"])
    metrics = quality_metrics(model, tok, load_tasks(sample_dir, cfg.max_items, pool),
                              held_out[:: max(1, len(held_out)
                              // (4 * cfg.max_items))], blocks[: cfg.max_items], cfg)
    row = {k: item[k] for k in ("model", "subset", "seed", "model_ref")} | metrics
    return store.write_shard(ref, shard, pa.Table.from_pylist([row]), records=1)
