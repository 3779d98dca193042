"""Text rules that decide what a computation sees: the normalised key for train/test disjointness, an
instruction record's identity, the one word tokeniser and the one word n-gram windower.

A library module (fingerprinted): editing a rule here changes the code version of every stage that uses
it, so a resumed run never reuses items split under the old rule."""

from __future__ import annotations

import html
import re
import unicodedata

WORD = re.compile(r"\w+")
# Markup left in extracted web text: tags and comments become a space, character entities their character.
MARKUP = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]{0,500}>"
                    r"|&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z]{2,31});", re.S)
# What joins two pieces of one word: soft hyphens and zero-width characters, and a hyphen between word
# characters, also across a line break (a word hyphenated at a line end is one word again).
JOINER = re.compile(r"[\u00ad\u200b\u200c\u200d\u2060\ufeff]"
                    r"|(?<=\w)[-\u2010\u2011](?:[ \t]*\r?\n[ \t]*)?(?=\w)")


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


def _unmarked(piece: str) -> str:
    """A markup match's replacement: a tag or comment is a space (it separated words), an entity its text."""
    return " " if piece.startswith("<") else html.unescape(piece)


def _folded(text: str) -> str:
    """Compatibility decomposition with the combining marks dropped (ligatures, full-width forms, accents)."""
    if text.isascii():
        return text
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def match_words(text: str) -> list[str]:
    """Lower-cased words after undoing reformatting (markup, entities, hyphenation at line ends, soft
    hyphens, Unicode compatibility forms and accents): the contamination rule's words, so a re-wrapped or
    re-typeset copy of an item still matches (line breaks, spacing, quotes and case never mattered)."""
    unmarked = MARKUP.sub(lambda m: _unmarked(m.group()), text)
    return [w.lower() for w in WORD.findall(JOINER.sub("", _folded(unmarked)))]


def match_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, word) in the original text of every word `match_words` finds, in the same order: where
    a cut must go when a matched n-gram is removed (slower than `match_words`: only matched documents)."""
    pieces: list[tuple[str, int, int]] = []  # (prepared text, start, end of its source in `text`)
    pos = 0
    for m in [*MARKUP.finditer(text), None]:
        pieces += [(_folded(text[i]), i, i + 1) for i in range(pos, m.start() if m else len(text))]
        if m:
            pieces.append((_folded(_unmarked(m.group())), m.start(), m.end()))
            pos = m.end()
    prepared = "".join(p for p, _, _ in pieces)
    starts = [s for p, s, _ in pieces for _ in p]
    ends = [e for p, _, e in pieces for _ in p]
    keep = [True] * len(prepared)
    for j in JOINER.finditer(prepared):
        keep[j.start():j.end()] = [False] * (j.end() - j.start())
    kept = [i for i, k in enumerate(keep) if k]
    joined = "".join(prepared[i] for i in kept)
    return [(starts[kept[w.start()]], ends[kept[w.end() - 1]], w.group().lower())
            for w in WORD.finditer(joined)]


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
