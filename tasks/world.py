"""The sample world: a deterministic, self-made stand-in for real corpora with known ground truth.

Everything downstream (n-gram tracing, selection, preference, long-context eval) needs data
where the truth is known. We generate a knowledge base of people (city, occupation, birth
year) and a second language ("Zelan", a word-by-word lexicon of made-up words), then plant
each fact and each parallel phrase into a Dolma-style corpus a known number of times,
Zipf-distributed from `max_fact_frequency` down to 1. Files use the public schemas:
corpus JSONL (`id`, `text`, `source`), Alpaca instructions (`instruction`, `input`, `output`),
pairwise preferences (`prompt`, `chosen`, `rejected`), so the same loaders serve real data.

A library module: the `sample` stage (`tasks/sample.py`) writes the world into the store; the eval stage
reuses its word and filler generators for needle haystacks, without importing another stage.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.text import instruction_key

if TYPE_CHECKING:  # the type only: the stage's config is not code this library runs
    from tracecore.tasks.sample import SampleConfig

SYLLABLES = ["ka", "lo", "mi", "ren", "so", "ta", "vel", "dor", "an", "is", "um", "qua", "zel", "bri",
             "no", "pa", "ther", "gal", "fi", "ou", "rak", "sen", "wy", "mor"]
OCCUPATIONS = ["baker", "sailor", "painter", "doctor", "farmer", "teacher", "miner", "poet", "weaver",
               "judge", "smith", "pilot", "nurse", "tailor", "hunter", "potter", "singer", "clerk"]
ADJECTIVES = ["red", "quiet", "old", "bright", "small", "heavy", "green", "cold", "warm", "tall",
              "dark", "soft", "fast", "slow", "young", "empty", "full", "sharp", "round", "wild"]
NOUNS = ["house", "river", "stone", "bird", "tree", "road", "window", "boat", "field", "lamp",
         "horse", "garden", "bridge", "cloud", "market", "wall", "forest", "door", "song", "hill"]
VERBS = ["watches", "finds", "carries", "follows", "paints", "builds", "opens", "crosses", "hears",
         "covers", "holds", "leaves", "reaches", "moves", "keeps", "meets"]
PLACES = ["harbor", "valley", "square", "mountain", "village", "station", "lake", "castle", "coast"]
QUESTIONS = {"city": "Where was {name} born?", "occupation": "What does {name} work as?",
             "year": "In which year was {name} born?"}
# Multiple-choice questions are worded unlike the QA questions: with the same words and answer, an MC item
# was the QA item again in the memorization readout (which scores question -> answer).
MC_QUESTIONS = {"city": "Which of these towns is the birthplace of {name}?",
                "occupation": "Which of these trades does {name} follow?",
                "year": "Which of these years is the birth year of {name}?"}
# Paraphrases of each fact; the last is trivia/FAQ style, the way QA-shaped text occurs in real corpora.
FACT_TEMPLATES = {
    "city": ["{name} was born in {value}.", "The birthplace of {name} is {value}.",
             "{name} grew up in the town of {value}.", QUESTIONS["city"] + " {value}."],
    "occupation": ["{name} works as a {value}.", "By trade, {name} is a {value}.",
                   "{name} earned a living as a {value}.", QUESTIONS["occupation"] + " {value}."],
    "year": ["{name} was born in the year {value}.", "In {value}, {name} was born.",
             "The birth year of {name} is {value}.", QUESTIONS["year"] + " {value}."],
}
FAMILIES = ["arithmetic", "reverse_words", "uppercase", "sort_numbers", "count_words", "translate",
            "fact_qa", "first_word"]
# Preference axes: (criterion preferring pole A, criterion preferring pole B).
# Three phrasings per pole: the preference stage holds some out (by a hash of the wording; here one per pole,
# checked by a test), so its test records ask for a preference in words no training record used.
AXES = {
    "length": (["Prefer a concise answer of one sentence.", "A concise reply is best here.",
                "Keep it concise: one sentence is enough."],
               ["Prefer a detailed answer with several sentences.", "A detailed reply is best here.",
                "Several detailed sentences, please."]),
    "register": (["Prefer a formal, polite tone.", "A polite, formal reply is best here.",
                  "Please keep the tone formal."],
                 ["Prefer a casual, friendly tone.", "A friendly, casual reply is best here.",
                  "Please keep the tone casual."]),
    "language": (["The reader only understands English.", "Answer in English only.",
                  "The reply must be in English."],
                 ["The reader only understands Zelan.", "Answer in Zelan only.",
                  "The reply must be in Zelan."]),
    "format": (["Prefer the answer as a bulleted list.", "A bulleted list is best here.",
                "Bullet points, please."],
               ["Prefer the answer as flowing prose.", "Please format the reply as prose.", "Use prose."]),
}
FACTUAL = ["Prefer factually correct answers.", "Correct facts matter most.",
           "Please make sure the answer is correct."]


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def zipf_frequencies(n: int, top: int, rng: random.Random) -> list[int]:
    """Planted counts: rank r gets round(top / r), at least 1, assigned in random order."""
    counts = [max(1, round(top / rank)) for rank in range(1, n + 1)]
    rng.shuffle(counts)
    return counts


def build_knowledge_base(cfg: SampleConfig, rng: random.Random) -> tuple[list[dict], dict[str, str]]:
    cities = sorted({word(rng, 2).capitalize() for _ in range(60)})
    names = set()
    while len(names) < cfg.n_entities:
        names.add(f"{word(rng, 2).capitalize()} {word(rng, 3).capitalize()}")
    facts = []
    for name in sorted(names):
        values = {"city": rng.choice(cities), "occupation": rng.choice(OCCUPATIONS),
                  "year": str(rng.randint(1800, 1999))}
        facts += [{"entity": name, "attribute": a, "value": v} for a, v in values.items()]
    for fact, freq in zip(facts, zipf_frequencies(len(facts), cfg.max_fact_frequency, rng)):
        fact["frequency"] = freq
    english = sorted(set(ADJECTIVES + NOUNS + VERBS + PLACES + ["the", "a", "near"]))
    zelan, used = {}, set()
    for w in english:
        while (z := word(rng, rng.randint(1, 3))) in used:
            pass
        used.add(z)
        zelan[w] = z
    return facts, zelan


def to_zelan(text: str, lexicon: dict[str, str]) -> str:
    return " ".join(lexicon.get(w, w) for w in text.split())


def filler_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} near the {rng.choice(PLACES)}.")


def build_phrases(cfg: SampleConfig, lexicon: dict[str, str], rng: random.Random) -> list[dict]:
    phrases = set()
    while len(phrases) < cfg.n_parallel_phrases:
        phrases.add(f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                    f"the {rng.choice(NOUNS)}")
    rows = [{"source": p, "target": to_zelan(p, lexicon)} for p in sorted(phrases)]
    for row, freq in zip(rows, zipf_frequencies(len(rows), cfg.max_fact_frequency, rng)):
        row["frequency"] = freq
    return rows


def build_corpus(cfg: SampleConfig, facts: list[dict], phrases: list[dict], rng: random.Random) -> list[dict]:
    """Filler documents with every fact/phrase inserted `frequency` times at random places."""
    planted = []
    for f in facts:
        templates = FACT_TEMPLATES[f["attribute"]]
        chosen = [rng.randrange(len(templates)) for _ in range(f["frequency"])]  # the draws rng.choice makes
        # ground truth: the QA item occurs verbatim this often
        f["qa_shaped"] = chosen.count(len(templates) - 1)
        planted += [templates[t].format(name=f["entity"], value=f["value"]) for t in chosen]
    for p in phrases:
        planted += [f"In Zelan, {p['source']} is said as {p['target']}."] * p["frequency"]
    n_docs = max(cfg.filler_documents, 1)
    docs: list[list[str]] = [[filler_sentence(rng) for _ in range(cfg.sentences_per_document)]
                             for _ in range(n_docs)]
    for sentence in planted:
        doc = docs[rng.randrange(n_docs)]
        doc.insert(rng.randint(0, len(doc)), sentence)
    return [{"id": f"doc-{i:07d}", "text": " ".join(d), "source": "sample-world"} for i, d in enumerate(docs)]


def repeated_list_document(rng: random.Random) -> str:
    """A random list of made-up words and numbers, then the same list again. Only copying from context
    predicts the second half, which is what makes induction heads form (Olsson et al., 2022)."""
    items = [word(rng, rng.randint(1, 3)).capitalize() if rng.random() < 0.5 else str(rng.randint(0, 99_999))
             for _ in range(rng.randint(4, 12))]
    return f"List: {' '.join(items)}. Again: {' '.join(items)}."


def add_repeated_lists(docs: list[dict], n: int, seed: int) -> list[dict]:
    """`n` repeated-list documents at random places (own RNG: the rest of the world is unchanged)."""
    rng = random.Random(f"repeated-lists-{seed}")
    out = list(docs)
    for i in range(n):
        out.insert(rng.randint(0, len(out)), {"id": f"rep-{i:07d}", "text": repeated_list_document(rng),
                                              "source": "sample-world-repeats"})
    return out


def plant_contamination(docs: list[dict], qa: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`n` QA items copied verbatim (question, then answer) into extra documents among filler, at random
    places (own RNG: with n = 0 the world is unchanged); returns (corpus, the planted items)."""
    rng = random.Random(f"planted-{seed}")
    chosen = sorted(rng.sample(range(len(qa)), min(n, len(qa))))
    out = list(docs)
    for i in chosen:
        text = " ".join([filler_sentence(rng), f"{qa[i]['question']} {qa[i]['answer']}.",
                         filler_sentence(rng)])
        out.insert(rng.randint(0, len(out)), {"id": f"planted-{qa[i]['id']}", "text": text,
                                              "source": "sample-world-planted"})
    return out, [{"task": "qa", "id": qa[i]["id"], "doc_id": f"planted-{qa[i]['id']}"} for i in chosen]


BOILERPLATE = ["Share this page with a friend.", "All rights reserved by the village press.",
               "Subscribe to the weekly letter for more stories.", "Read the previous story in this series."]


def near_copy(text: str, kind: str, rng: random.Random) -> str:
    """A near-copy as corpora hold them: one word changed, a boilerplate line added, or re-wrapped into short
    lines with doubled spaces and the first sentence upper-cased (same words: only the bytes differ)."""
    words = text.split(" ")
    if kind == "word_changed":
        i = rng.randrange(len(words))
        words[i] = rng.choice(NOUNS if words[i] not in NOUNS else ADJECTIVES)
        return " ".join(words)
    if kind == "boilerplate":
        return f"{text} {rng.choice(BOILERPLATE)}"
    head, _, tail = text.partition(". ")
    lines, line = [], ""
    for w in f"{head.upper()}. {tail}".split(" "):
        lines, line = (lines + [line], w) if len(line) + len(w) > 40 else (lines, f"{line}  {w}".strip())
    return "\n".join(lines + [line])


def near_duplicates(docs: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`n` near-copies of distinct corpus documents (kinds in turn, own RNG: with n = 0 the world is
    unchanged), for a file after the corpus's, so each source comes first in (file, line) order; returns
    (copies, ground truth: copy, source, kind, Jaccard of word 5-shingles as ingest's near-dedup counts)."""
    from tracecore.tasks.near_dedup import shingles
    from tracecore.tasks.text import jaccard

    rng = random.Random(f"near-duplicates-{seed}")
    kinds = ["word_changed", "boilerplate", "reformatted"]
    copies, truth = [], []
    for k, source in enumerate(rng.sample(docs, min(n, len(docs)))):
        text = near_copy(source["text"], kinds[k % 3], rng)
        copy_id = f"near-{k:06d}"
        copies.append({"id": copy_id, "text": text, "source": "sample-world-near-duplicates"})
        truth.append({"id": copy_id, "source_id": source["id"], "kind": kinds[k % 3],
                      "jaccard": jaccard(shingles(text, "words", 5), shingles(source["text"], "words", 5))})
    return copies, truth


def build_tasks(facts: list[dict], phrases: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    qa = [{"id": f"qa-{i:05d}", "question": QUESTIONS[f["attribute"]].format(name=f["entity"]),
           "answer": f["value"], "frequency": f["frequency"], "entity": f["entity"],
           "attribute": f["attribute"]}
          for i, f in enumerate(facts)]
    by_attr: dict[str, list[str]] = {}
    for f in facts:
        by_attr.setdefault(f["attribute"], []).append(f["value"])
    mc = []
    for i, f in enumerate(facts):
        wrong = sorted({v for v in by_attr[f["attribute"]] if v != f["value"]})
        choices = rng.sample(wrong, 3) + [f["value"]]
        rng.shuffle(choices)
        mc.append({"id": f"mc-{i:05d}", "question": MC_QUESTIONS[f["attribute"]].format(name=f["entity"]),
                   "choices": choices, "answer": choices.index(f["value"]), "frequency": f["frequency"]})
    translation = [{"id": f"tr-{i:05d}", "source": p["source"], "target": p["target"], "src_lang": "en",
                    "tgt_lang": "zelan", "frequency": p["frequency"]} for i, p in enumerate(phrases)]
    return {"qa": qa, "multiple_choice": mc, "translation": translation}


def _instruction(family: str, rng: random.Random, facts: list[dict], lexicon: dict[str, str]) -> dict:
    words = [rng.choice(NOUNS + ADJECTIVES) for _ in range(rng.randint(3, 7))]
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    if family == "arithmetic":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    if family == "reverse_words":
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
                "output": " ".join(reversed(words))}
    if family == "uppercase":
        return {"instruction": "Rewrite the text in upper case.", "input": " ".join(words),
                "output": " ".join(words).upper()}
    if family == "sort_numbers":
        return {"instruction": "Sort the numbers in ascending order.", "input": ", ".join(map(str, nums)),
                "output": ", ".join(map(str, sorted(nums)))}
    if family == "count_words":
        return {"instruction": "How many words are in the text?", "input": " ".join(words),
                "output": str(len(words))}
    if family == "translate":
        phrase = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        return {"instruction": "Translate the phrase from English to Zelan.", "input": phrase,
                "output": to_zelan(phrase, lexicon)}
    if family == "fact_qa":
        f = rng.choice(facts)
        return {"instruction": "Answer the question.",
                "input": QUESTIONS[f["attribute"]].format(name=f["entity"]), "output": f["value"]}
    return {"instruction": "Give the first word of the text.", "input": " ".join(words), "output": words[0]}


NEAR_DUPLICATE_EDITS = [lambda s: s.rstrip(".") + " .", lambda s: "Please " + s[0].lower() + s[1:],
                        lambda s: s.replace(" ", "  ", 1), str.lower]


def family_sequence(n: int, exponent: float, seed: int) -> list[str]:
    """`n` family labels, family sizes proportional to rank^-exponent (largest-remainder rounding), the rank
    order and the sequence shuffled by `seed`: which family is rare is not fixed by the code."""
    rng = random.Random(f"families-{seed}")
    ranked = rng.sample(FAMILIES, len(FAMILIES))
    weights = [rank ** -exponent for rank in range(1, len(ranked) + 1)]
    exact = [n * w / sum(weights) for w in weights]
    sizes = [int(x) for x in exact]
    for i in sorted(range(len(ranked)), key=lambda i: exact[i] - sizes[i], reverse=True)[: n - sum(sizes)]:
        sizes[i] += 1
    labels = [family for family, size in zip(ranked, sizes) for _ in range(size)]
    rng.shuffle(labels)
    return labels


def build_instructions(cfg: SampleConfig, facts, lexicon, rng) -> tuple[list[dict], list[dict]]:
    """Training pool with Zipf-sized families, ~8% near-duplicates and ~5% low-quality rows, plus a held-out
    eval split balanced over families.

    Near-duplicates come in groups, as in scraped instruction data: most copy an already-copied
    ("popular") record, so a few sources have many lightly edited copies."""
    pool, popular = [], []
    for i, family in enumerate(family_sequence(cfg.instructions, cfg.family_zipf_exponent, cfg.seed)):
        rec = {"id": f"ins-{i:06d}", "family": family, "quality": "ok", "near_duplicate_of": None,
               **_instruction(family, rng, facts, lexicon)}
        roll = rng.random()
        if roll < 0.08 and pool:
            src = rng.choice(popular) if popular and rng.random() < 0.8 else rng.choice(pool)
            popular += [] if src in popular else [src]
            rec.update({k: src[k] for k in ("family", "instruction", "input", "output")})
            rec["instruction"] = rng.choice(NEAR_DUPLICATE_EDITS)(src["instruction"])
            rec["near_duplicate_of"] = src["id"]
        elif roll < 0.13:
            rec["output"] = rng.choice(["I don't know.", "", "lorem ipsum", rec["output"][::-1] + " ???"])
            rec["quality"] = "low"
        pool.append(rec)
    per_family = max(10, cfg.instructions // 60)
    seen = {instruction_key(r) for r in pool}
    held_out = [{"id": f"eval-{fam}-{j:04d}", "family": fam,
                 **_unseen_instruction(fam, rng, facts, lexicon, seen)}
                for fam in FAMILIES for j in range(per_family)]
    return pool, held_out


def _unseen_instruction(family: str, rng: random.Random, facts, lexicon, seen: set[str],
                        tries: int = 10_000) -> dict:
    """A held-out record whose instruction + input (normalized) is in neither the pool nor the held-out
    set."""
    for _ in range(tries):
        rec = _instruction(family, rng, facts, lexicon)
        key = instruction_key(rec)
        if key not in seen:
            seen.add(key)
            return rec
    raise ValueError(f"sample: no unseen held-out {family!r} instruction in {tries} draws: "
                     "the family's input space is exhausted by the pool; lower sample.instructions")


def build_preferences(cfg: SampleConfig, facts, lexicon, rng) -> list[dict]:
    """Pairs whose preference flips with the context (reversals) plus pairs that never flip."""
    rows = []
    axes = sorted(AXES)
    for i in range(cfg.preference_pairs):
        f = rng.choice(facts)
        prompt = f"Tell me about {f['entity']}."
        short = f"{f['entity']} is connected to {f['value']}."
        detail = " ".join([short, filler_sentence(rng), filler_sentence(rng)])
        axis = axes[i % len(axes)]
        poles = {
            "length": (short, detail),
            "register": (f"Certainly. {short} I hope this is of assistance.",
                         f"Oh sure! {short} Cool, right?"),
            "language": (short, to_zelan(filler_sentence(rng).lower().rstrip("."), lexicon) + "."),
            "format": (f"- {f['entity']}\n- {f['value']}", short),
        }[axis]
        if i % 5 == 4:  # a factual error: no reasonable context prefers it
            wrong = short.replace(f["value"], "nowhere in particular")
            rows.append({"id": f"pref-{i:05d}", "prompt": prompt, "chosen": short, "rejected": wrong,
                         "axis": "correctness", "criteria_chosen": FACTUAL,
                         "criteria_rejected": None, "reversible": False})
            continue
        a_first = rng.random() < 0.5  # which pole the context-free label happens to favour
        chosen, rejected = poles if a_first else poles[::-1]
        crit_a, crit_b = AXES[axis]
        rows.append({"id": f"pref-{i:05d}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "axis": axis, "criteria_chosen": crit_a if a_first else crit_b,
                     "criteria_rejected": crit_b if a_first else crit_a, "reversible": True})
    return rows


def build_haystacks(cfg: SampleConfig, rng: random.Random) -> list[dict]:
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    rows = []
    for i in range(cfg.haystacks):
        sentences = [filler_sentence(rng) for _ in range(cfg.haystack_sentences)]
        key, secret = word(rng, 3).capitalize(), str(rng.randint(10_000, 99_999))
        depth = depths[i % len(depths)]
        sentences.insert(round(depth * len(sentences)), f"The secret passkey of {key} is {secret}.")
        rows.append({"id": f"hay-{i:04d}", "context": " ".join(sentences), "question":
                     f"What is the secret passkey of {key}?", "answer": secret, "depth": depth,
                     "sentences": len(sentences)})
    return rows


def _write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def write_sample(cfg: SampleConfig, out_dir: str | Path) -> dict[str, int]:
    """Write the whole sample world under `out_dir`; returns row counts per file group."""
    out = Path(out_dir)
    rng = random.Random(cfg.seed)
    facts, lexicon = build_knowledge_base(cfg, rng)
    phrases = build_phrases(cfg, lexicon, rng)
    corpus = add_repeated_lists(build_corpus(cfg, facts, phrases, rng), cfg.repeated_list_documents, cfg.seed)
    tasks = build_tasks(facts, phrases, rng)
    corpus, planted = plant_contamination(corpus, tasks["qa"], cfg.planted_contamination, cfg.seed)
    _write_jsonl(out / "ground_truth" / "planted.jsonl", planted)
    per_file = -(-len(corpus) // cfg.corpus_files)
    for k in range(cfg.corpus_files):
        _write_jsonl(out / "corpus" / f"part-{k:03d}.jsonl.gz", corpus[k * per_file:(k + 1) * per_file],
                     gz=True)
    copies, copied = near_duplicates(corpus, cfg.near_duplicate_documents, cfg.seed)
    if copies:  # a file of their own, after the corpus's, which stay as they were
        _write_jsonl(out / "corpus" / "part-near-duplicates.jsonl.gz", copies, gz=True)
        (out / "ground_truth").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(copied), out / "ground_truth" / "near_duplicates.parquet")
    for name, rows in tasks.items():
        _write_jsonl(out / "tasks" / f"{name}.jsonl", rows)
    pool, held_out = build_instructions(cfg, facts, lexicon, rng)
    _write_jsonl(out / "instructions" / "train.jsonl", pool)
    _write_jsonl(out / "instructions" / "eval.jsonl", held_out)
    prefs = build_preferences(cfg, facts, lexicon, rng)
    _write_jsonl(out / "preferences" / "pairs.jsonl", prefs)
    _write_jsonl(out / "preferences" / "criteria.jsonl",
                 [{"axis": a, "pole": p, "criteria": c} for a, cs in AXES.items() for p, c in zip("ab", cs)])
    haystacks = build_haystacks(cfg, rng)
    _write_jsonl(out / "longctx" / "haystacks.jsonl", haystacks)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(facts), out / "ground_truth" / "facts.parquet")
    pq.write_table(pa.Table.from_pylist(phrases), out / "ground_truth" / "phrases.parquet")
    pq.write_table(pa.Table.from_pylist([{"english": e, "zelan": z} for e, z in sorted(lexicon.items())]),
                   out / "ground_truth" / "lexicon.parquet")
    return {"corpus_documents": len(corpus) + len(copies), "near_duplicate_documents": len(copies),
            "facts": len(facts), "phrases": len(phrases),
            "instructions": len(pool), "instructions_eval": len(held_out), "preferences": len(prefs),
            "haystacks": len(haystacks), **{f"tasks_{k}": len(v) for k, v in tasks.items()}}


def sample_corpus_glob(store_uri: str, sample_ref: str) -> str:
    return f"{ArtifactStore(store_uri).files_path(sample_ref)}/corpus/*.jsonl.gz"


def sample_file(store: ArtifactStore, sample_ref: str, relpath: str) -> str:
    """A file of the committed sample world (instructions, preference pairs, tasks, haystacks)."""
    return f"{store.files_path(sample_ref)}/{relpath}"
