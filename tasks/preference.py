"""Stage `preference`: context-conditioned preference data with reversals, and a context-aware reward model
(arXiv 2407.14916).

Builder (Dask-parallel over input files): pairwise exports (`prompt`, `chosen`, `rejected`), RPR-style
rows (`prompt`, `response_a`, `response_b`, `criteria_x|y`, `scenario_x|y`), and the sample world. Each
pair gets contexts from (a) its own context columns, (b) the criteria library (`configs/libraries/criteria.yaml`)
matched by a feature scorer, (c) optionally a local instruct LM by path. Every (pair, context) becomes two
records, one per response order, so labels are balanced and position carries no signal; every pair also
gets a no-context record. Exact and near-duplicate pairs are removed, splits are by prompt.

Reward model: `AutoModelForSequenceClassification` (one scalar) from the bootstrap model, Bradley-Terry
loss on `[context] + [prompt] + [response]`; accuracy without context, with the correct context and with
the reversed context on the held-out split. Deviation: RPR's `profile_*` columns carry no label of which
response they favour, so they are not used as contexts.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import yaml

from configs.schema import PreferenceConfig
from storage.lineage import code_version, lineage
from storage.store import ArtifactStore
from tasks.common import (
    MODEL_LOAD_LOCK,
    already_committed,
    figure_png,
    get_logger,
    map_shards,
    plan_ref,
    stage_task,
    subplots,
)

CONTEXT_TYPES = ("criteria", "scenario", "profile", "none")
RECORD_SCHEMA = pa.schema([(c, pa.string()) for c in ("prompt", "context", "context_type", "response_a",
                                                        "response_b", "preferred", "pair_id", "source", "split")])
REJECT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("reason", pa.string())])
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
    from configs.schema import PROFILE_DIR

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
            "stats": f"preference_stats/{fp}", "reward_model": f"reward_model/{fp}", "eval": f"preference_eval/{fp}"}


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
    if fmt == "sample":
        contexts += [(rec.get("criteria_chosen"), "criteria", "a", "input"),
                     (rec.get("criteria_rejected"), "criteria", "b", "input")]
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
    default = "a" if fmt in ("pairwise", "sample") else None
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


def split_of(prompt: str, test_fraction: float, seed: int) -> str:
    bucket = int(hashlib.sha256(f"{seed}|{prompt}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


def expand(pair: dict, split: str) -> list[dict]:
    """Records for every (context, order) plus the no-context record in both orders."""
    pair_id = hashlib.sha256(json.dumps([pair["prompt"], sorted((pair["a"], pair["b"]))]).encode()).hexdigest()[:16]
    contexts = [(c, t, pref, src) for c, t, pref, src in json.loads(pair["contexts"])]
    contexts.append(("", "none", pair["default"] or "a", "none"))
    rows = []
    for context, ctype, preferred, source in contexts:
        for flip in (False, True):
            a, b = (pair["b"], pair["a"]) if flip else (pair["a"], pair["b"])
            label = {"a": "b", "b": "a"}[preferred] if flip else preferred
            rows.append({"prompt": pair["prompt"], "context": context, "context_type": ctype, "response_a": a,
                         "response_b": b, "preferred": label, "pair_id": pair_id, "source": source, "split": split})
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
    no_context, splits, pairs = set(), {}, set()
    for r in rows:
        pairs.add(r["pair_id"])
        orders.setdefault((r["pair_id"], r["context"]), set()).add(r["response_a"])
        if r["context_type"] == "none":
            no_context.add(r["pair_id"])
        splits.setdefault(r["prompt"], set()).add(r["split"])
    return {"contexts_missing_an_order": sum(len(o) != 2 for o in orders.values()),
            "pairs_without_no_context_record": len(pairs - no_context),
            "prompts_in_two_splits": sum(len(s) > 1 for s in splits.values()),
            "label_imbalance": abs(sum(r["preferred"] == "a" for r in rows) * 2 - len(rows))}


# ---- context-aware reward model -----------------------------------------------------------------
def rm_text(context: str, prompt: str, response: str) -> str:
    return f"[context] {context or 'none'}\n[prompt] {prompt}\n[response] {response}"


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


def rewards(model, tok, texts: list[str], max_len: int):
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    return model(**enc).logits.squeeze(-1)


def train_reward_model(model, tok, rows: list[dict], cfg: PreferenceConfig, log) -> list[dict]:
    """Bradley-Terry: minimize -log sigmoid(r(preferred) - r(other)) over (context, prompt) records."""
    import random

    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.rm_lr)
    rng, curve = random.Random(cfg.seed), []
    model.train()
    for epoch in range(cfg.rm_epochs):
        order = rows[:]
        rng.shuffle(order)
        for i in range(0, len(order), cfg.rm_batch_size):
            batch = order[i:i + cfg.rm_batch_size]
            good = [rm_text(r["context"], r["prompt"], r[f"response_{r['preferred']}"]) for r in batch]
            bad = [rm_text(r["context"], r["prompt"], r["response_b" if r["preferred"] == "a" else "response_a"])
                   for r in batch]
            scores = rewards(model, tok, good + bad, cfg.rm_max_len)
            loss = -F.logsigmoid(scores[:len(batch)] - scores[len(batch):]).mean()
            loss.backward()
            opt.step(), opt.zero_grad(set_to_none=True)
            curve.append({"epoch": epoch, "step": len(curve) + 1, "loss": float(loss)})
        log.info("reward model epoch %d loss %.3f", epoch + 1, curve[-1]["loss"])
    return curve


def evaluate(model, tok, rows: list[dict], cfg: PreferenceConfig) -> list[dict]:
    """Accuracy on reversal pairs of the held-out split: no context, correct context, reversed context."""
    import torch

    model.eval()
    reversals = reversal_pairs(rows)
    records = [r for r in rows if r["context_type"] != "none" and r["pair_id"] in reversals]
    by_pair: dict[str, list[dict]] = {}
    for r in records:
        by_pair.setdefault(r["pair_id"], []).append(r)
    cases = []
    for r in records:
        opposite = [o for o in by_pair[r["pair_id"]] if o["response_a"] == r["response_a"]
                    and o["preferred"] != r["preferred"]]
        same_type = [o for o in opposite if o["context_type"] == r["context_type"]] or opposite
        cases.append((r, same_type[0]["context"] if same_type else None))
    texts = sorted({rm_text(c, r["prompt"], r[k]) for r, rev in cases for c in ("", r["context"], rev or "")
                    for k in ("response_a", "response_b")})
    with torch.no_grad():
        scores = {}
        for i in range(0, len(texts), 64):
            chunk = texts[i:i + 64]
            scores.update(zip(chunk, rewards(model, tok, chunk, cfg.rm_max_len).tolist()))

    def correct(r, context):
        diff = scores[rm_text(context, r["prompt"], r["response_a"])] - scores[rm_text(context, r["prompt"], r["response_b"])]
        return (diff > 0) == (r["preferred"] == "a")

    out = []
    for ctype in ("all", "criteria", "scenario", "profile"):
        sel = [(r, rev) for r, rev in cases if ctype == "all" or r["context_type"] == ctype]
        if not sel:
            continue
        with_rev = [(r, rev) for r, rev in sel if rev is not None]
        out += [{"setting": "no_context", "context_type": ctype, "n": len(sel),
                 "accuracy": sum(correct(r, "") for r, _ in sel) / len(sel)},
                {"setting": "correct_context", "context_type": ctype, "n": len(sel),
                 "accuracy": sum(correct(r, r["context"]) for r, _ in sel) / len(sel)},
                {"setting": "reversed_context", "context_type": ctype, "n": len(with_rev),
                 "accuracy": sum(correct(r, rev) for r, rev in with_rev) / max(len(with_rev), 1)}]
    return out


def accuracy_png(table: list[dict]) -> bytes:
    rows = [r for r in table if r["context_type"] == "all"]
    fig, ax = subplots(figsize=(5, 3))
    ax.bar([r["setting"].replace("_", " ") for r in rows], [r["accuracy"] for r in rows],
           color=["grey", "tab:green", "tab:red"])
    ax.axhline(0.5, color="black", lw=0.5, ls="--")
    ax.set(ylim=(0, 1), ylabel="accuracy", title="context-aware reward model (held-out reversal pairs)")
    return figure_png(fig)


def run_preference(store_uri: str, cfg: PreferenceConfig, model_ref: str, inputs: list[list[str]], inputs_id: str,
                   refs: dict[str, str], address: str | None = None) -> dict[str, str]:
    import tempfile

    from tasks.pretrain import model_dir

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
        rows = [row for p in pairs for row in expand(p, split_of(p["prompt"], cfg.test_fraction, cfg.seed))]
        for shard, split in enumerate(("train", "test")):
            store.write_shard(refs["data"], shard, pa.Table.from_pylist([r for r in rows if r["split"] == split],
                                                                        schema=RECORD_SCHEMA))
        store.commit(refs["data"], {**record, "pairs": len(pairs), "splits": ["train", "test"]}, expected_shards=2)
        store.write_shard(refs["stats"], 0, pa.Table.from_pylist(statistics(rows, len(pairs), exact, near, rejected)))
        store.commit(refs["stats"], {**record, "report_columns": ["metric", "value"]}, expected_shards=1)

        with model_dir(store, model_ref) as folder:
            tok, model = load_reward_model(folder, cfg)
        curve = train_reward_model(model, tok, [r for r in rows if r["split"] == "train"], cfg, log)
        with tempfile.TemporaryDirectory(prefix="tracecore-rm-") as tmp:
            (model.merge_and_unload() if cfg.rm_lora else model).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            store.put_dir(refs["reward_model"], tmp)
        store.write_shard(refs["reward_model"], 0, pa.Table.from_pylist(curve))
        store.commit(refs["reward_model"], record, expected_shards=1)
        table = evaluate(model, tok, [r for r in rows if r["split"] == "test"], cfg)
        store.write_shard(refs["eval"], 0, pa.Table.from_pylist(table))
        store.write_file(refs["eval"], "plots/accuracy.png", accuracy_png(table))
        store.commit(refs["eval"], {**record, "plots": ["plots/accuracy.png"],
                                    "report_columns": ["setting", "context_type", "n", "accuracy"]},
                     expected_shards=1)
        for r in table:
            if r["context_type"] == "all":
                log.info("preference RM %s accuracy %.3f (n=%d)", r["setting"], r["accuracy"], r["n"])
    return refs


preference_task = stage_task(run_preference, "preference")
