"""Where a preference pair's contexts come from: the criteria library matched by a feature scorer on the
pair's own features, or a local instruct LM by path (asked for a criterion and its verdict). A library module
of the preference stage (fingerprinted with it), apart so the stage module reads top to bottom.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.common import MODEL_LOAD_LOCK
from tracecore.tasks.text import normalize_text

CONTEXT_TYPES = ("criteria", "scenario", "profile", "none")
ENGLISH = {"the", "is", "a", "to", "of", "and", "in", "was", "connected", "i", "hope", "this", "cool",
           "right", "certainly", "sure", "near", "answer", "about", "it", "for", "you"}
FORMAL, CASUAL = ("certainly", "please", "assistance", "kindly", "regards"), ("oh", "cool", "hey", "sure!",
                                                                              "!")
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
        if (e.get("type") not in CONTEXT_TYPES[:3] or e.get("feature") not in FEATURES
                or e.get("prefers") not in ("higher", "lower") or not str(e.get("context", "")).strip()):
            raise ValueError(f"{path}: entry {i} needs context, type in {CONTEXT_TYPES[:3]}, feature in "
                             f"{sorted(FEATURES)} and prefers in ('higher', 'lower'); got {e}")
    return entries


def feature_side(entry: dict, pair: dict) -> str | None:
    """The response a library entry prefers on this pair, or None when its feature does not tell them
    apart."""
    diff = FEATURES[entry["feature"]](pair["a"]) - FEATURES[entry["feature"]](pair["b"])
    if abs(diff) < MARGINS[entry["feature"]]:
        return None
    higher = "a" if diff > 0 else "b"
    return higher if entry["prefers"] == "higher" else ("b" if higher == "a" else "a")


def library_contexts(pair: dict, library: list[dict]) -> list[tuple]:
    """Library criteria for a pair, with the side each prefers. A pair with labeled contexts of its own gets
    only the features those contexts name (a library entry with the same words) and only where the feature
    picks the side they labeled, because a feature proxy applied across axes contradicts the pair (the
    `english` share made 'the reader only understands Zelan' prefer a bulleted list); a pair without contexts
    gets every feature
    that separates its responses, the scorer being its only labeler."""
    sides = [feature_side(e, pair) for e in library]
    own = {normalize_text(c): side for c, _, side, _ in pair["contexts"]}
    features = {e["feature"] for e in library}
    if own:
        named = [(e["feature"], side == own[normalize_text(e["context"])]) for e, side in zip(library, sides)
                 if normalize_text(e["context"]) in own]
        features = {f for f, _ in named} - {f for f, agrees in named if not agrees}
    return [(e["context"], e["type"], side, "library") for e, side in zip(library, sides)
            if side and e["feature"] in features]


def unique_contexts(contexts: list[tuple]) -> list[tuple]:
    """One context per normalised text, the first kept (the pair's own before the library's): the same words
    entering twice were scored twice."""
    seen, out = set(), []
    for c in contexts:
        if (key := normalize_text(c[0])) not in seen:
            seen.add(key)
            out.append(c)
    return out


def parse_judgement(text: str) -> str | None:
    """'A'/'B' (first standalone letter) from a judge's answer; None when it names neither."""
    match = re.search(r"\b([AB])\b", text.strip().upper())
    return match.group(1).lower() if match else None


def lm_contexts(pair: dict, lm, template: str) -> list[tuple]:
    """A criterion proposed by a local instruct LM, and the side the same LM says it favours (tagged `lm`)."""
    tok, model = lm

    def generate(prompt: str) -> str:
        if getattr(tok, "chat_template", None):  # an instruct model answers in its own format
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
        else:
            ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    criterion = generate(template.format(prompt=pair["prompt"], a=pair["a"],
                                         b=pair["b"])).split("\n")[0].strip()
    if not criterion:
        return []
    verdict = parse_judgement(generate(f"Criterion: {criterion}\nResponse A: {pair['a']}\nResponse B: "
                                       f"{pair['b']}\n"
                                       "Under this criterion the better response is (A or B):"))
    return [(criterion, "criteria", verdict, "lm")] if verdict else []


def load_context_lm(path: str, store: ArtifactStore | None = None):
    """(tokenizer, model) of a folder, or of a GGUF file / packaged model imported into `store` once."""
    import contextlib

    from tracecore.tasks.gguf_models import import_gguf, is_gguf
    from tracecore.tasks.models import model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = model_dir(store, import_gguf(store, path, "preference.context_lm_path")) if is_gguf(path) else \
        contextlib.nullcontext(path)
    with where as folder, MODEL_LOAD_LOCK:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        return tok, AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                         trust_remote_code=False).eval()
