"""Text rules that decide what a computation sees: the normalised key for train/test disjointness, an
instruction record's identity, the lower-cased word tokeniser.

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


def words(text: str) -> list[str]:
    """Lower-cased word tokens (\\w+): one tokeniser for every word-level rule."""
    return WORD.findall(text.lower())
