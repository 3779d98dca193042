"""Stage `preference`: context-conditioned preference data with reversals, and a context-aware reward model
(arXiv 2407.14916).

Builder (Dask-parallel over input files): pairwise exports (`prompt`, `chosen`, `rejected`), RPR-style
rows (`prompt`, `response_a`, `response_b`, `criteria_x|y`, `scenario_x|y`), and the sample world. Each
pair gets contexts from (a) its own context columns, (b) the criteria library (`configs/libraries/criteria.yaml`)
matched by a feature scorer, (c) optionally a local instruct LM by path. Every (pair, context) becomes two
records, one per response order, so labels are balanced and position carries no signal; every pair also
gets a no-context record. Exact and near-duplicate pairs are removed, splits are by prompt.

Reward model: `AutoModelForSequenceClassification` (one scalar) from the bootstrap model, Bradley-Terry
loss on `[context] [prompt] [response]` (truncated so the response is never cut), and a context-blind
baseline trained the same way on the same records without contexts. Splits are by prompt and, for contexts,
by phrasing (a hash of the wording): test records use only wordings no training record has. Metrics, each
with a Wilson interval: context-conditioned accuracy (aware vs. blind: the paper's claim is the gap), joint
accuracy on reversal pairs (right under both contexts at once), no-context accuracy on pairs with a
context-free winner only; an in-distribution diagnostic (held-out prompts under training phrasings) beside
them. Ties count as wrong. Deviation: RPR's `profile_*` columns carry no label of which response they
favour, so they are not used as contexts; RPR pairs get no no-context record (no context-free label).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import yaml
from tracecore.configs.schema import PreferenceConfig
from tracecore.storage.lineage import code_version, lineage
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.common import (
    MODEL_LOAD_LOCK,
    already_committed,
    figure_png,
    get_logger,
    map_shards,
    normalize_text,
    plan_ref,
    stage_task,
    subplots,
)

CONTEXT_TYPES = ("criteria", "scenario", "profile", "none")
RECORD_SCHEMA = pa.schema([(c, pa.string()) for c in ("prompt", "context", "context_type", "response_a",
                                                        "response_b", "preferred", "pair_id", "source", "split")])
REJECT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])
# test: held-out prompts under held-out phrasings (the metrics); test_seen_phrasing: held-out prompts under
# training phrasings, an in-distribution diagnostic reported beside them (`*_seen_phrasing` rows)
SPLITS = ("train", "test", "test_seen_phrasing")
ENGLISH = {"the", "is", "a", "to", "of", "and", "in", "was", "connected", "i", "hope", "this", "cool", "right",
           "certainly", "sure", "near", "answer", "about", "it", "for", "you"}
FORMAL, CASUAL = ("certainly", "please", "assistance", "kindly", "regards"), ("oh", "cool", "hey", "sure!", "!")
FEATURES = {
    "length": lambda t: len(t.split()),
    "formality": lambda t: sum(m in t.lower() for m in FORMAL) - sum(m in t.lower() for m in CASUAL),
    "english": lambda t: sum(w in ENGLISH for w in re.findall(r"[a-z]+", t.lower())) / max(len(t.split()), 1),
    "list": lambda t: sum(line.lstrip().startswith(("- ", "* ", "1.")) for line in t.splitlines()),
}
MARGINS = {"length": 5, "formality": 1, "english": 0.3, "list": 1}


def load_library(spec: str | None) -> list[dict]:
    if not spec:
        return []
    from tracecore.configs.schema import PROFILE_DIR

    path = PROFILE_DIR / "libraries" / "criteria.yaml" if spec == "builtin" else Path(spec)
    entries = yaml.safe_load(path.read_text()) or []
    for i, e in enumerate(entries):
        if e.get("type") not in CONTEXT_TYPES[:3] or e.get("feature") not in FEATURES or e.get("prefers") not in (
                "higher", "lower") or not str(e.get("context", "")).strip():
            raise ValueError(f"{path}: entry {i} needs context, type in {CONTEXT_TYPES[:3]}, feature in "
                             f"{sorted(FEATURES)} and prefers in ('higher', 'lower'); got {e}")
    return entries


def plan_preference(cfg: PreferenceConfig, model_ref: str, inputs_id: str) -> dict[str, str]:
    library = hashlib.sha256(json.dumps(load_library(cfg.criteria_library)).encode()).hexdigest()[:16]
    data = plan_ref("preference_data", "preference", cfg.fingerprint(),
                    {"model": model_ref, "inputs": inputs_id, "library": library}, __name__)
    fp = data.split("/")[1]
    return {"parsed": f"preference_parsed/{fp}", "data": data, "rejects": f"preference_rejects/{fp}",
            "stats": f"preference_stats/{fp}", "reward_model": f"reward_model/{fp}",
            "rm_scores": f"preference_rm_scores/{fp}", "eval": f"preference_eval/{fp}"}


# ---- parsing and validation ---------------------------------------------------------------------
def to_pair(rec: object, fmt: str) -> tuple[dict | None, str | None]:
    """Normalize a row to {prompt, a, b, default, contexts: [(text, type, preferred, source)]} or a reason."""
    if not isinstance(rec, dict):
        return None, f"record is a {type(rec).__name__}, not an object"
    names = {"pairwise": ("chosen", "rejected"), "sample": ("chosen", "rejected"), "rpr": ("response_a", "response_b")}
    if fmt not in names:
        return None, f"unknown input format {fmt!r}"
    ka, kb = names[fmt]
    missing = [k for k in ("prompt", ka, kb) if k not in rec]
    if missing:
        return None, f"missing field(s) {missing}"
    prompt, a, b = rec["prompt"], rec[ka], rec[kb]
    if not all(isinstance(x, str) for x in (prompt, a, b)):
        return None, "prompt and responses must be strings"
    if not prompt.strip() or not a.strip() or not b.strip():
        return None, "empty prompt or response"
    if a.strip() == b.strip():
        return None, "identical responses"
    contexts = []
    if fmt == "sample":  # one criterion or a list of phrasings per side
        for side, key in (("a", "criteria_chosen"), ("b", "criteria_rejected")):
            value = rec.get(key)
            contexts += [(c, "criteria", side, "input") for c in (value if isinstance(value, list) else [value])]
    if fmt == "rpr":
        for kind in ("criteria", "scenario"):
            contexts += [(rec.get(f"{kind}_x"), kind, "a", "input"), (rec.get(f"{kind}_y"), kind, "b", "input")]
    for ctx in rec.get("contexts", []) or []:  # explicit list: {context, type, preferred}
        if not isinstance(ctx, dict) or ctx.get("type") not in CONTEXT_TYPES[:3]:
            return None, f"unknown context type {ctx.get('type') if isinstance(ctx, dict) else ctx!r}"
        if ctx.get("preferred") not in ("a", "b"):
            return None, f"label {ctx.get('preferred')!r} outside {{a, b}}"
        contexts.append((ctx.get("context"), ctx["type"], ctx["preferred"], "input"))
    contexts = [c for c in contexts if isinstance(c[0], str) and c[0].strip()]
    # a context-free winner exists for a pairwise export's chosen side and a sample pair marked not
    # reversible (its factual pairs); RPR pairs and reversible pairs have none, so they get no no-context record
    default = "a" if fmt == "pairwise" or (fmt == "sample" and rec.get("reversible") is False) else None
    return {"prompt": prompt, "a": a, "b": b, "default": default, "contexts": contexts}, None


def library_contexts(pair: dict, library: list[dict]) -> list[tuple]:
    """Library criteria whose feature tells the two responses apart, with the side each one prefers."""
    out = []
    for entry in library:
        diff = FEATURES[entry["feature"]](pair["a"]) - FEATURES[entry["feature"]](pair["b"])
        if abs(diff) >= MARGINS[entry["feature"]]:
            higher = "a" if diff > 0 else "b"
            out.append((entry["context"], entry["type"], higher if entry["prefers"] == "higher" else
                        ("b" if higher == "a" else "a"), "library"))
    return out


def parse_judgement(text: str) -> str | None:
    """'A'/'B' (first standalone letter) from a judge's answer; None when it names neither."""
    match = re.search(r"\b([AB])\b", text.strip().upper())
    return match.group(1).lower() if match else None


def lm_contexts(pair: dict, lm, template: str) -> list[tuple]:
    """A criterion proposed by a local instruct LM, and the side the same LM says it favours."""
    tok, model = lm

    def generate(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    criterion = generate(template.format(prompt=pair["prompt"], a=pair["a"], b=pair["b"])).split("\n")[0].strip()
    if not criterion:
        return []
    verdict = parse_judgement(generate(f"Criterion: {criterion}\nResponse A: {pair['a']}\nResponse B: {pair['b']}\n"
                                       "Under this criterion the better response is (A or B):"))
    return [(criterion, "criteria", verdict, "lm")] if verdict else []


def load_context_lm(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with MODEL_LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return tok, AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False).eval()


def read_lines(path: str) -> list[tuple[int, object]]:
    import fsspec

    rows = []
    with fsspec.open(path, "rb", compression="infer") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rows.append((line_no, json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as exc:
                rows.append((line_no, f"non-UTF-8 bytes at byte {exc.start}"))
            except json.JSONDecodeError as exc:
                rows.append((line_no, f"bad JSON: {exc.msg}"))
    return rows


def parse_input(store_uri: str, ref: str, shard: int, item: tuple, cfg: PreferenceConfig) -> dict:
    """One input file -> normalized pairs (with contexts) + rejects, as one shard each."""
    store = ArtifactStore(store_uri)
    path, fmt, rejects_ref = item
    library = load_library(cfg.criteria_library)
    lm = load_context_lm(cfg.context_lm_path) if cfg.context_lm_path else None
    pairs, rejects = [], []
    for line, rec in read_lines(path):
        pair, reason = (None, rec) if isinstance(rec, str) else to_pair(rec, fmt)
        if reason:
            rejects.append({"file": path, "line": line, "reason": reason})
            continue
        contexts = pair["contexts"] + library_contexts(pair, library)
        if lm is not None:
            contexts += lm_contexts(pair, lm, cfg.context_lm_template)
        pairs.append({"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"], "default": pair["default"],
                      "contexts": json.dumps(sorted(set(contexts))), "source": f"{Path(path).name}:{line}"})
    store.write_shard(rejects_ref, shard, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    schema = pa.schema([(k, pa.string()) for k in ("prompt", "a", "b", "default", "contexts", "source")])
    return store.write_shard(ref, shard, pa.Table.from_pylist(pairs, schema=schema), rejects=len(rejects))


# ---- dataset assembly ---------------------------------------------------------------------------
def shingles(text: str, k: int = 3) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def dedup_pairs(pairs: list[dict], threshold: float) -> tuple[list[dict], int, int]:
    """Drop exact duplicates (same prompt and response set) and near-duplicates (Jaccard of word
    3-shingles >= threshold) among pairs with the same prompt; first occurrence wins."""
    kept, exact, near, seen, by_prompt = [], 0, 0, set(), {}
    for p in pairs:
        key = (p["prompt"], frozenset((p["a"], p["b"])))
        if key in seen:
            exact += 1
            continue
        sh = shingles(" ".join((p["prompt"], *sorted((p["a"], p["b"])))))
        if any(len(sh & o) / len(sh | o) >= threshold for o in by_prompt.get(p["prompt"], [])):
            near += 1
            continue
        seen.add(key)
        by_prompt.setdefault(p["prompt"], []).append(sh)
        kept.append(p)
    return kept, exact, near


def hash_split(key: str, test_fraction: float) -> str:
    """A deterministic split by a hash of `key`: the same key lands on the same side in every run."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


def split_of(prompt: str, test_fraction: float, seed: int) -> str:
    return hash_split(f"{seed}|{prompt}", test_fraction)


def context_split(context: str, test_fraction: float) -> str:
    """Held-out phrasings: a context text is a test phrasing by a hash of its normalized words alone, so the
    same wording lands on the same side for every pair and no test context was seen in training."""
    return hash_split(f"context|{normalize_text(context)}", test_fraction)


def expand(pair: dict, split: str, context_test_fraction: float | None = None) -> list[dict]:
    """Records for every (context, order), plus the no-context record in both orders where the pair has a
    context-free winner. With `context_test_fraction`, only the contexts phrased for `split` are kept."""
    pair_id = hashlib.sha256(json.dumps([pair["prompt"], sorted((pair["a"], pair["b"]))]).encode()).hexdigest()[:16]
    contexts = []
    for c, t, pref, src in json.loads(pair["contexts"]):
        phrasing = split if context_test_fraction is None else context_split(c, context_test_fraction)
        if phrasing == split:
            contexts.append((c, t, pref, src, split))
        elif split == "test":  # a held-out prompt under a training phrasing: the in-distribution diagnostic
            contexts.append((c, t, pref, src, "test_seen_phrasing"))
    if pair["default"]:
        contexts.append(("", "none", pair["default"], "none", split))
    rows = []
    for context, ctype, preferred, source, record_split in contexts:
        for flip in (False, True):
            a, b = (pair["b"], pair["a"]) if flip else (pair["a"], pair["b"])
            label = {"a": "b", "b": "a"}[preferred] if flip else preferred
            rows.append({"prompt": pair["prompt"], "context": context, "context_type": ctype, "response_a": a,
                         "response_b": b, "preferred": label, "pair_id": pair_id, "source": source,
                         "split": record_split})
    return rows


def reversal_pairs(rows: list[dict]) -> set[str]:
    """Pairs with contexts that prefer different responses (in the original order)."""
    sides: dict[str, set[str]] = {}
    for r in rows:
        if r["context_type"] != "none":
            first = r["preferred"] if r["response_a"] <= r["response_b"] else {"a": "b", "b": "a"}[r["preferred"]]
            sides.setdefault(r["pair_id"], set()).add(first)
    return {p for p, s in sides.items() if len(s) == 2}


def statistics(rows: list[dict], pairs: int, exact: int, near: int, rejected: int) -> list[dict]:
    import numpy as np

    lengths = np.array([len(r["response_a"].split()) for r in rows]) if rows else np.zeros(1)
    reversals = reversal_pairs(rows)
    stats = [{"metric": f"records[{t}]", "value": float(sum(r["context_type"] == t for r in rows))}
             for t in CONTEXT_TYPES]
    stats += [{"metric": "pairs", "value": float(pairs)}, {"metric": "reversal_pairs", "value": float(len(reversals))},
              {"metric": "reversal_rate", "value": len(reversals) / max(pairs, 1)},
              {"metric": "label_a_share", "value": sum(r["preferred"] == "a" for r in rows) / max(len(rows), 1)},
              {"metric": "exact_duplicates_removed", "value": float(exact)},
              {"metric": "near_duplicates_removed", "value": float(near)},
              {"metric": "rejected", "value": float(rejected)}]
    stats += [{"metric": f"response_words_p{q}", "value": float(np.percentile(lengths, q))} for q in (10, 50, 90)]
    stats += [{"metric": name, "value": float(value)} for name, value in guarantee_violations(rows).items()]
    return stats


def guarantee_violations(rows: list[dict]) -> dict[str, int]:
    """Each guarantee the dataset promises, counted from the records themselves (all must be 0)."""
    orders: dict[tuple, set] = {}
    no_context: dict[str, int] = {}
    splits: dict[str, set] = {}
    for r in rows:
        orders.setdefault((r["pair_id"], r["context"]), set()).add(r["response_a"])
        if r["context_type"] == "none":
            no_context[r["pair_id"]] = no_context.get(r["pair_id"], 0) + 1
        splits.setdefault(r["prompt"], set()).add(r["split"].removesuffix("_seen_phrasing"))
    return {"contexts_missing_an_order": sum(len(o) != 2 for o in orders.values()),
            "no_context_records_not_in_both_orders": sum(n != 2 for n in no_context.values()),
            "prompts_in_two_splits": sum(len(s) > 1 for s in splits.values()),
            "label_imbalance": abs(sum(r["preferred"] == "a" for r in rows) * 2 - len(rows))}


# ---- context-aware reward model -----------------------------------------------------------------
def rm_ids(tok, context: str, prompt: str, response: str, max_len: int) -> list[int]:
    """Token ids of `[context] [prompt] [response]` within max_len: the response is never cut (the reward is
    read at its last token); the prompt gives way from its start first, then the context from its end."""
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ctx, prm, resp = enc(f"[context] {context or 'none'}\n"), enc(f"[prompt] {prompt}\n"), enc(f"[response] {response}")
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
            model_dir, num_labels=1, local_files_only=True, trust_remote_code=False, pad_token_id=tok.pad_token_id)
    if cfg.rm_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, task_type="SEQ_CLS",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
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


def train_reward_model(model, tok, rows: list[dict], cfg: PreferenceConfig, log, with_context: bool = True) -> list[dict]:
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


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k of n: stays inside [0, 1], unlike a normal interval at 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # rounding never excludes p


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
    joint_reversal: per reversal pair, every (context preferring a, context preferring b) combination,
      right under both at once (a model that ignores context scores 0 here, so the blind one is not listed);
    no_context_unconditional: pairs with a context-free winner (e.g. factual errors), no context given."""
    context_rows = [r for r in rows if r["context_type"] != "none"]
    plain_rows = [r for r in rows if r["context_type"] == "none"]
    diffs = {}
    for name, score, with_context in (("context_aware", score_aware, True), ("context_blind", score_blind, False)):
        items = scored_items(rows, with_context)
        table = dict(zip(items, [float(x) for x in score(items)]))
        diffs[name] = {id(r): table[rm_item(r, "response_a", with_context)] - table[rm_item(r, "response_b", with_context)]
                       for r in rows}
    out = []
    for ctype in ("all", "criteria", "scenario", "profile"):
        sel = [r for r in context_rows if ctype == "all" or r["context_type"] == ctype]
        for model in ("context_aware", "context_blind"):
            out.append(_accuracy_row("context_conditioned", model, ctype,
                                     [is_correct(diffs[model][id(r)], r["preferred"]) for r in sel]))
        out.append(_accuracy_row("joint_reversal", "context_aware", ctype, joint_outcomes(sel, diffs["context_aware"])))
    for model in ("context_aware", "context_blind"):
        out.append(_accuracy_row("no_context_unconditional", model, "all",
                                 [is_correct(diffs[model][id(r)], r["preferred"]) for r in plain_rows]))
    return [r for r in out if r["n"]]


def joint_outcomes(rows: list[dict], diffs: dict[int, float]) -> list[bool]:
    """Per reversal pair and response order, each (context for a, context for b): both right at once."""
    by_key: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        by_key.setdefault((r["pair_id"], r["response_a"]), {}).setdefault(r["preferred"], []).append(r)
    return [is_correct(diffs[id(ra)], "a") and is_correct(diffs[id(rb)], "b")
            for sides in by_key.values() for ra in sides.get("a", []) for rb in sides.get("b", [])]


def _accuracy_row(metric: str, model: str, ctype: str, outcomes: list[bool]) -> dict:
    lo, hi = wilson(sum(outcomes), len(outcomes))
    return {"metric": metric, "model": model, "context_type": ctype, "n": len(outcomes),
            "accuracy": sum(outcomes) / len(outcomes) if outcomes else float("nan"), "lo": lo, "hi": hi}


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
    ax.set(xlim=(0, 1), xlabel="accuracy (95 % Wilson)", title="reward models on held-out pairs and phrasings")
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
            return [x for i in range(0, len(items), 64) for x in rewards(model, tok, items[i:i + 64], max_len).tolist()]
    return score


def train_and_score(store_uri: str, ref: str, shard: int, item: dict, cfg: PreferenceConfig) -> dict:
    """One reward model (a Dask shard, so the context-aware and the context-blind model train in parallel):
    train on the train split, save the context-aware one, and score every held-out (context, prompt,
    response) that `evaluate` asks it for; the blind model sees no context, in training or in scoring."""
    import tempfile

    import torch
    from tracecore.tasks.pretrain import model_dir

    torch.set_num_threads(cfg.threads) if cfg.threads else None
    store, log, aware = ArtifactStore(store_uri), get_logger(), item["kind"] == "context_aware"
    rows = store.read_table(item["data_ref"]).to_pylist()
    with model_dir(store, item["model_ref"]) as folder:
        tok, model = load_reward_model(folder, cfg)
    curve = [{**c, "model": item["kind"]}
             for c in train_reward_model(model, tok, [r for r in rows if r["split"] == "train"], cfg, log, aware)]
    store.write_shard(item["rm_ref"], shard, pa.Table.from_pylist(curve))
    if aware:
        with tempfile.TemporaryDirectory(prefix="tracecore-rm-") as tmp:
            (model.merge_and_unload() if cfg.rm_lora else model).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            store.put_dir(item["rm_ref"], tmp)
    items = scored_items([r for r in rows if r["split"] != "train"], aware)
    scores = score_with(model, tok, cfg.rm_max_len)(items)
    table = pa.Table.from_pylist([{"kind": item["kind"], "context": c, "prompt": p, "response": resp, "reward": float(x)}
                                  for (c, p, resp), x in zip(items, scores)], schema=SCORE_SCHEMA)
    return store.write_shard(ref, shard, table, records=len(items))


def scorer(scores: list[dict], kind: str):
    """`evaluate`'s scorer from a reward model's stored rewards."""
    table = {(r["context"], r["prompt"], r["response"]): r["reward"] for r in scores if r["kind"] == kind}
    return lambda items: [table[item] for item in items]


def run_preference(store_uri: str, cfg: PreferenceConfig, model_ref: str, inputs: list[list[str]], inputs_id: str,
                   refs: dict[str, str], address: str | None = None) -> dict[str, str]:
    store, log = ArtifactStore(store_uri), get_logger()
    with store.lock(refs["eval"]):
        if already_committed(store, "preference", refs["eval"]):
            return refs
        record = lineage("preference", cfg.fingerprint(), {"model": model_ref, "inputs": inputs_id},
                         code_version(__name__))
        parsed = map_shards("preference", store, refs["parsed"], parse_input,
                            [(path, fmt, refs["rejects"]) for path, fmt in inputs], address, cfg=cfg)
        store.commit(refs["rejects"], record, expected_shards=len(inputs))
        store.commit(refs["parsed"], {**record, "seconds": parsed.seconds, "skipped_shards": parsed.skipped},
                     expected_shards=len(inputs))
        rejected = sum(m.get("rejects", 0) for m in parsed.markers)
        pairs, exact, near = dedup_pairs(store.read_table(refs["parsed"]).to_pylist(), cfg.near_duplicate_threshold)
        rows = [row for p in pairs
                for row in expand(p, split_of(p["prompt"], cfg.test_fraction, cfg.seed), cfg.context_test_fraction)]
        for shard, split in enumerate(SPLITS):
            store.write_shard(refs["data"], shard, pa.Table.from_pylist([r for r in rows if r["split"] == split],
                                                                        schema=RECORD_SCHEMA))
        store.commit(refs["data"], {**record, "pairs": len(pairs), "splits": list(SPLITS)}, expected_shards=len(SPLITS))
        store.write_shard(refs["stats"], 0, pa.Table.from_pylist(statistics(rows, len(pairs), exact, near, rejected)))
        store.commit(refs["stats"], {**record, "report_columns": ["metric", "value"]}, expected_shards=1)

        for shard in range(len(RM_KINDS)):  # a model's curve and its scores are one unit of work
            if not (store.shard_done(refs["reward_model"], shard) and store.shard_done(refs["rm_scores"], shard)):
                store.drop_shard(refs["rm_scores"], shard)
        trained = map_shards("preference", store, refs["rm_scores"], train_and_score,
                             [{"kind": kind, "model_ref": model_ref, "data_ref": refs["data"],
                               "rm_ref": refs["reward_model"]} for kind in RM_KINDS], address, cfg=cfg)
        store.commit(refs["reward_model"], record, expected_shards=len(RM_KINDS))
        store.commit(refs["rm_scores"], {**record, "seconds": trained.seconds}, expected_shards=len(RM_KINDS))
        aware, blind_score = (scorer(store.read_table(refs["rm_scores"]).to_pylist(), kind) for kind in RM_KINDS)
        table = evaluate(aware, blind_score, [r for r in rows if r["split"] == "test"])
        seen = [r for r in rows if r["split"] == "test_seen_phrasing"]
        table += [{**r, "metric": f"{r['metric']}_seen_phrasing"}
                  for r in evaluate(aware, blind_score, seen) if r["metric"] == "context_conditioned"]
        store.write_shard(refs["eval"], 0, pa.Table.from_pylist(table))
        store.write_file(refs["eval"], "plots/accuracy.png", accuracy_png(table))
        store.commit(refs["eval"], {**record, "plots": ["plots/accuracy.png"],
                                    "report_columns": ["metric", "model", "context_type", "n", "accuracy", "lo", "hi"]},
                     expected_shards=1)
        for r in table:
            if r["context_type"] == "all":
                log.info("preference %s %s accuracy %.3f [%.3f, %.3f] (n=%d)", r["metric"], r["model"],
                         r["accuracy"], r["lo"], r["hi"], r["n"])
    return refs


preference_task = stage_task(run_preference, "preference")
