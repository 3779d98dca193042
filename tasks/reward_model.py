"""The context-aware reward model of arXiv 2407.14916: a sequence-classification head on the base causal LM,
trained Bradley-Terry on (context, prompt, chosen, rejected), and its context-blind twin (same data, no
context) as the control. Each trains as one Dask shard and scores the held-out items; `evaluate` turns
the rewards into accuracies with Wilson intervals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.intervals import wilson
from tracecore.tasks.plots import figure_png, subplots
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK, get_logger, set_torch_threads

if TYPE_CHECKING:  # the type only: the stage's config is not code this library runs
    from tracecore.tasks.preference import PreferenceConfig


def rm_ids(tok, context: str, prompt: str, response: str, max_len: int) -> list[int]:
    """Token ids of `[context] [prompt] [response]` within max_len: the response is never cut (the reward is
    read at its last token); the prompt gives way from its start first, then the context from its end."""
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ctx, prm, resp = enc(f"[context] {context or 'none'}\n"), enc(f"[prompt] {prompt}\n"), enc(f"[response] "
                                                                                               f"{response}")
    room = max(0, max_len - len(bos) - len(resp))
    prm = prm[max(0, len(prm) - max(0, room - len(ctx))):] if len(ctx) + len(prm) > room else prm
    ctx = ctx[:max(0, room - len(prm))]
    return bos + ctx + prm + resp


def load_reward_model(model_dir: str, cfg: PreferenceConfig):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with MODEL_LOAD_LOCK:
        torch.manual_seed(cfg.seed)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, local_files_only=True, trust_remote_code=False,
            pad_token_id=tok.pad_token_id)
    if cfg.rm_lora:
        from peft import LoraConfig, get_peft_model
        from tracecore.tasks.models import lora_kwargs

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, task_type="SEQ_CLS",
                                                 **lora_kwargs(model, cfg.rm_target_modules,
                                                               "preference.rm_target_modules")))
    return tok, model


def rewards(model, tok, items: list[tuple[str, str, str]], max_len: int):
    """One scalar per (context, prompt, response), right-padded (the model reads the last real token)."""
    import torch

    seqs = [rm_ids(tok, *item, max_len) for item in items]
    width, pad = max(map(len, seqs)), tok.pad_token_id
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
    return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def bt_examples(rows: list[dict], with_context: bool = True) -> list[tuple[str, str, str, str]]:
    """(context, prompt, winner, loser) once per comparison. The dataset keeps both response orders (balanced
    labels for pairwise classifiers), but a Bradley-Terry model scores each response alone, so the two orders
    are one example: training on both doubled the reward models' cost. The blind model gets "" for the context
    but keeps one example per original record (a reversal's two sides stay two, opposite, examples)."""
    seen, out = set(), []
    for r in rows:
        win = r[f"response_{r['preferred']}"]
        lose = r["response_b" if r["preferred"] == "a" else "response_a"]
        if (key := (r["context"], r["prompt"], win, lose)) not in seen:
            seen.add(key)
            out.append((r["context"] if with_context else "", r["prompt"], win, lose))
    return out


def train_reward_model(model, tok, rows: list[dict], cfg: PreferenceConfig, log,
                       with_context: bool = True) -> list[dict]:
    """Bradley-Terry: minimize -log sigmoid(r(preferred) - r(other)) over (context, prompt) comparisons
    (`bt_examples`). The context-blind baseline trains on the same comparisons with every context removed."""
    import random

    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.rm_lr)
    rng, curve, examples = random.Random(cfg.seed), [], bt_examples(rows, with_context)
    model.train()
    for epoch in range(cfg.rm_epochs):
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), cfg.rm_batch_size):
            batch = order[i:i + cfg.rm_batch_size]
            good = [(c, p, win) for c, p, win, _ in batch]
            bad = [(c, p, lose) for c, p, _, lose in batch]
            scores = rewards(model, tok, good + bad, cfg.rm_max_len)
            loss = -F.logsigmoid(scores[:len(batch)] - scores[len(batch):]).mean()
            loss.backward()
            opt.step(), opt.zero_grad(set_to_none=True)
            curve.append({"epoch": epoch, "step": len(curve) + 1, "loss": loss.item()})
        log.info("reward model (%s) epoch %d loss %.3f", "context-aware" if with_context else "context-blind",
                 epoch + 1, curve[-1]["loss"])
    return curve


def is_correct(diff: float, preferred: str) -> bool:
    """r(a) - r(b) agrees with the label; a tie is not a preference, so it is never correct."""
    return diff > 0 if preferred == "a" else diff < 0


def rm_item(r: dict, side: str, with_context: bool) -> tuple[str, str, str]:
    """What a reward model scores for one response of a record: (context, prompt, response); the blind model
    never sees the context."""
    return (r["context"] if with_context else "", r["prompt"], r[side])


def scored_items(rows: list[dict], with_context: bool) -> list[tuple[str, str, str]]:
    """Every distinct item `evaluate` asks a reward model to score for `rows`, in a fixed order."""
    return sorted({rm_item(r, side, with_context) for r in rows for side in ("response_a", "response_b")})


def evaluate(score_aware, score_blind, rows: list[dict]) -> list[dict]:
    """Held-out metrics that a model can fail (each `score_*` maps [(context, prompt, response)] -> rewards):
    context_conditioned: every held-out context record (contexts phrased unlike any training context), the
      context-aware model with the context vs. the context-blind baseline without it; the paper's claim is
      the gap between the two;
    joint_reversal (first): per reversal pair, every (context preferring a, context preferring b) combination,
      right under both at once (a model that ignores context scores 0 here, so the blind one is not listed;
      a coin per record scores 0.25);
    no_context_unconditional: pairs with a context-free winner (e.g. factual errors), no context given."""
    context_rows = [r for r in rows if r["context_type"] != "none"]
    plain_rows = [r for r in rows if r["context_type"] == "none"]
    diffs = {}
    for name, score, with_context in (("context_aware", score_aware, True),
                                      ("context_blind", score_blind, False)):
        items = scored_items(rows, with_context)
        table = dict(zip(items, [float(x) for x in score(items)]))
        diffs[name] = {id(r): table[rm_item(r, "response_a",
                                            with_context)] - table[rm_item(r, "response_b", with_context)]
                       for r in rows}
    by_type = {ctype: [r for r in context_rows if ctype == "all" or r["context_type"] == ctype]
               for ctype in ("all", "criteria", "scenario", "profile")}
    out = [_accuracy_row("joint_reversal", "context_aware", ctype,
                         joint_outcomes(sel, diffs["context_aware"]), chance=0.25, ceiling=0.0)
           for ctype, sel in by_type.items()]  # joint first: the one a blind model cannot reach
    for ctype, sel in by_type.items():
        for model in ("context_aware", "context_blind"):
            out.append(_accuracy_row("context_conditioned", model, ctype,
                                     [is_correct(diffs[model][id(r)], r["preferred"]) for r in sel],
                                     chance=0.5, ceiling=blind_ceiling(sel)))
    for model in ("context_aware", "context_blind"):
        out.append(_accuracy_row("no_context_unconditional", model, "all",
                                 [is_correct(diffs[model][id(r)], r["preferred"]) for r in plain_rows],
                                 chance=0.5))
    return [r for r in out if r["n"]]


def blind_ceiling(rows: list[dict]) -> float:
    """The best accuracy any context-ignoring scorer reaches on `rows`: per pair, it can only pick the
    response more of the records favour. On a side-balanced set this is 0.5, the chance line a context-aware
    model must
    clear; above 0.5 the set itself rewards a side preference."""
    favoured: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = favoured.setdefault(r["pair_id"], {})
        counts[r[f"response_{r['preferred']}"]] = counts.get(r[f"response_{r['preferred']}"], 0) + 1
    return sum(max(c.values()) for c in favoured.values()) / len(rows) if rows else float("nan")


def joint_outcomes(rows: list[dict], diffs: dict[int, float]) -> list[bool]:
    """Per reversal pair and response order, each (context for a, context for b): both right at once."""
    by_key: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        by_key.setdefault((r["pair_id"], r["response_a"]), {}).setdefault(r["preferred"], []).append(r)
    return [is_correct(diffs[id(ra)], "a") and is_correct(diffs[id(rb)], "b")
            for sides in by_key.values() for ra in sides.get("a", []) for rb in sides.get("b", [])]


def _accuracy_row(metric: str, model: str, ctype: str, outcomes: list[bool], chance: float,
                  ceiling: float | None = None) -> dict:
    """`chance`: a scorer flipping a fair coin per record (per record pair for joint); `blind_ceiling`: the
    best context-ignoring scorer (None where a context-free label exists)."""
    lo, hi = wilson(sum(outcomes), len(outcomes))
    return {"metric": metric, "model": model, "context_type": ctype, "n": len(outcomes),
            "accuracy": sum(outcomes) / len(outcomes) if outcomes else float("nan"), "lo": lo, "hi": hi,
            "chance": chance, "blind_ceiling": ceiling}


def accuracy_png(table: list[dict]) -> bytes:
    """Horizontal bars (the metric names are long), aware green and blind grey, with Wilson intervals."""
    rows = [r for r in table if r["context_type"] == "all"][::-1]
    fig, ax = subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    acc = [r["accuracy"] for r in rows]
    ax.barh([f"{r['metric'].replace('_', ' ')} · {r['model'].replace('_', ' ')}" for r in rows], acc,
            xerr=[[a - r["lo"] for a, r in zip(acc, rows)], [r["hi"] - a for a, r in zip(acc, rows)]],
            color=["tab:green" if r["model"] == "context_aware" else "grey" for r in rows], capsize=3)
    ax.axvline(0.5, color="black", lw=0.5, ls="--")
    ax.tick_params(axis="y", labelsize=7)
    ax.set(xlim=(0, 1), xlabel="accuracy (95 % Wilson)",
           title="reward models on held-out pairs and phrasings")
    return figure_png(fig)


RM_KINDS = ("context_aware", "context_blind")  # shard order of reward_model curves and rm_scores
SCORE_SCHEMA = pa.schema([("kind", pa.string()), ("context", pa.string()), ("prompt", pa.string()),
                          ("response", pa.string()), ("reward", pa.float64())])


def score_with(model, tok, max_len: int):
    """A batched scorer for `evaluate`."""
    import torch

    model.eval()

    def score(items):
        with torch.no_grad():
            return [x for i in range(0, len(items), 64) for x in rewards(model, tok, items[i:i + 64],
                                                                         max_len).tolist()]
    return score


def train_and_score(store_uri: str, ref: str, shard: int, item: dict, cfg: PreferenceConfig) -> dict:
    """One reward model (a Dask shard, so the context-aware and the context-blind model train in parallel):
    train on the train split, save the context-aware one, and score every held-out (context, prompt,
    response) that `evaluate` asks it for; the blind model sees no context, in training or in scoring."""
    import tempfile

    from tracecore.tasks.models import model_dir
    set_torch_threads(cfg.threads)
    store, log, aware = ArtifactStore(store_uri), get_logger(), item["kind"] == "context_aware"
    rows = store.read_table(item["data_ref"]).to_pylist()
    with model_dir(store, item["model_ref"]) as folder:
        tok, model = load_reward_model(folder, cfg)
    curve = [{**c, "model": item["kind"]}
             for c in train_reward_model(model, tok, [r for r in rows if r["split"] == "train"], cfg, log,
                                         aware)]
    store.write_shard(item["rm_ref"], shard, pa.Table.from_pylist(curve))
    if aware:
        with tempfile.TemporaryDirectory(prefix="tracecore-rm-") as tmp:
            (model.merge_and_unload() if cfg.rm_lora else model).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            store.put_dir(item["rm_ref"], tmp)
    items = scored_items([r for r in rows if r["split"] != "train"], aware)
    scores = score_with(model, tok, cfg.rm_max_len)(items)
    table = pa.Table.from_pylist([{"kind": item["kind"], "context": c, "prompt": p, "response": resp,
                                   "reward": float(x)}
                                  for (c, p, resp), x in zip(items, scores)], schema=SCORE_SCHEMA)
    return store.write_shard(ref, shard, table, records=len(items))


def scorer(scores: list[dict], kind: str):
    """`evaluate`'s scorer from a reward model's stored rewards."""
    table = {(r["context"], r["prompt"], r["response"]): r["reward"] for r in scores if r["kind"] == kind}
    return lambda items: [table[item] for item in items]
