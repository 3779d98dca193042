"""Text rules that decide what a computation sees: the normalised key for train/test disjointness, an
instruction record's identity, the one word tokeniser and the one word n-gram windower.

A library module (fingerprinted): editing a rule here changes the code version of every stage that uses
it, so a resumed run never reuses items split under the old rule."""

from __future__ import annotations

import re

WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """Lower-cased words without punctuation: the key for train/test disjointness checks."""
    return " ".join(words(text))


def instruction_key(rec: dict) -> str:
    """An Alpaca-style record's identity for disjointness: its instruction and input, normalized."""
    return normalize_text(f"{rec['instruction']} {rec.get('input', '')}")


def words(text: str, lower: bool = True) -> list[str]:
    """Word tokens (\\w+, punctuation dropped): one tokeniser for every word-level rule; `lower=False` keeps
    the
    case where the words are looked up in a case-sensitive corpus index (memorization's task-grams)."""
    return WORD.findall(text.lower() if lower else text)


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, lower-cased word) of every word `words` finds: where a cut inside the text must go."""
    return [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text)]


def word_ngrams(tokens: list[str], n: int) -> list[str]:
    """The distinct n-word windows of `tokens` in order of first occurrence; the whole sequence when it is
    shorter than n (a short answer is still one gram); none for no words. The one windower of every word-level
    rule."""
    size = min(n, len(tokens))
    return list(dict.fromkeys(" ".join(tokens[i:i + size])
                              for i in range(len(tokens) - size + 1))) if size else []


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are the same text (1.0)."""
    return len(a & b) / len(a | b) if a or b else 1.0
