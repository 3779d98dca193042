"""The contamination rule survives reformatting: planted items are found (recall 1) and no clean document is
flagged (no false positive) after each transformation a corpus pipeline applies to text (re-wrapping to short
lines, doubled spaces, curly quotes, HTML tags and entities, case, hyphenation at line ends, soft hyphens,
ligatures and full-width forms, accents); decontamination cuts the matched span out of the original text."""

from __future__ import annotations

import html
import random
import textwrap

import pytest
from tracecore.tasks.text import match_spans, match_words
from tracecore.tasks.trace import document_hits, gram_index, remove_spans

ITEMS = [
    {"key": "qa/1",
     "input": "Which river flows through the ancient capital of the northern kingdom of Velmar",
     "output": "The Ostra"},
    {"key": "qa/2",
     "input": "Don't confuse the well-known astronomer's notebook with the lighthouse keeper's",
     "output": "logbook"},
    {"key": "qa/3",
     "input": "In what year did the cooperative of fishermen first publish its seasonal almanac",
     "output": "1874"},
]
FILLER = ("Every spring the market square fills with traders from the valley towns, who sell wool, cheese "
          "and carved wooden toys to the visitors arriving by the morning ferry. ")


def plain(item: dict) -> str:
    return f"{item['input']}? {item['output']}."


def rewrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 40))


def hyphenate_line_ends(text: str) -> str:
    """Typesetting: a word of letters crossing the 40-column edge is split with a hyphen at the line end."""
    lines, line = [], ""
    for word in text.split(" "):
        room = 40 - len(line) - 2
        if len(line) + len(word) + 1 > 40 and word.isalpha() and len(word) >= 6:
            cut = min(max(room, 3), len(word) - 3)
            lines.append(f"{line} {word[:cut]}-".strip())
            line = word[cut:]
        elif len(line) + len(word) + 1 > 40:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def soft_hyphens(text: str) -> str:
    return " ".join(w[:3] + "\u00ad" + w[3:] if len(w) > 6 else w for w in text.split(" "))


def html_markup(text: str) -> str:
    words = text.split(" ")
    words[2] = f"<b>{words[2]}</b>"
    words[5] = f'<a href="https://example.org/x?a=1&amp;b=2">{words[5]}</a>'
    return "<p>" + html.escape(" ".join(words), quote=False).replace("&lt;", "<").replace("&gt;", ">") \
        .replace(" ", "&nbsp;", 1) + "</p><!-- page 3 -->"


def full_width_and_ligatures(text: str) -> str:
    wide = "".join(chr(ord(c) + 0xFEE0) if "A" <= c <= "Z" else c for c in text)
    return wide.replace("fi", "\ufb01").replace("fl", "\ufb02")


def accented(text: str) -> str:
    return text.replace("e", "e\u0301", 2).replace("a", "\u00e0", 1)


TRANSFORMS = {
    "rewrap_40": rewrap,
    "double_spaces": lambda t: t.replace(" ", "  "),
    "curly_quotes": lambda t: t.replace("'", "\u2019").replace('"', "\u201c"),
    "html_tags_and_entities": html_markup,
    "upper_case": str.upper,
    "title_case": str.title,
    "hyphenated_line_ends": hyphenate_line_ends,
    "soft_hyphens": soft_hyphens,
    "full_width_and_ligatures": full_width_and_ligatures,
    "accents": accented,
    "crlf_tabs": lambda t: rewrap(t).replace("\n", "\r\n\t"),
}


def corpus(transform) -> list[dict]:
    """Three contaminating documents (one item each, transformed) among clean documents of the same words."""
    rng = random.Random(7)
    clean = [" ".join(rng.sample(" ".join(plain(i) for i in ITEMS).split(" "), 12)) + " " + FILLER
             for _ in range(20)]
    dirty = [FILLER + transform(plain(item)) + " " + FILLER for item in ITEMS]
    return [{"id": f"clean-{k}", "text": t} for k, t in enumerate(clean)] + \
           [{"id": f"dirty-{i['key']}", "text": t} for i, t in zip(ITEMS, dirty)]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_planted_items_are_found_after_reformatting_and_nothing_else(name):
    assert found_items(TRANSFORMS[name]) == {(f"dirty-{i['key']}", i["key"]) for i in ITEMS}, name


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_span_offsets_point_at_the_same_words_in_the_original(name):
    text = FILLER + TRANSFORMS[name](plain(ITEMS[1])) + " " + FILLER
    spans = match_spans(text)
    assert [w for _, _, w in spans] == match_words(text)
    assert all(match_words(text[s:e]) == [w] for s, e, w in spans)


@pytest.mark.parametrize("name", ["rewrap_40", "html_tags_and_entities", "hyphenated_line_ends"])
def test_decontamination_cuts_the_reformatted_span(name):
    item = ITEMS[0]
    text = FILLER + TRANSFORMS[name](plain(item)) + " " + FILLER
    gram = " ".join(match_words(plain(item))[:13])
    pieces = remove_spans(text, [gram], margin=0, min_chars=1, max_splits=5)
    assert pieces and not any(set(match_words(gram)[1:12]) <= set(match_words(p)) for p in pieces)
    assert match_words(pieces[0]) == match_words(FILLER)


def found_items(transform) -> set[tuple[str, str]]:
    index = gram_index(ITEMS, 13, 5)
    firsts = {size: {g.split(" ", 1)[0] for g in table} for size, table in index.items()}
    return {(doc["id"], key) for doc in corpus(transform)
            for key, _ in document_hits(doc["text"], index, firsts)}


def test_the_plain_words_rule_misses_reformatted_copies(monkeypatch):
    """The suite can fail: GPT-3's rule alone (lower-cased words, no undoing of reformatting) loses the
    marked-up, hyphenated, soft-hyphenated, re-typeset and accented copies."""
    import tracecore.tasks.trace as trace
    from tracecore.tasks.text import words

    monkeypatch.setattr(trace, "match_words", words)
    for name in ("html_tags_and_entities", "hyphenated_line_ends", "soft_hyphens", "full_width_and_ligatures",
                 "accents"):
        assert len(found_items(TRANSFORMS[name])) < len(ITEMS), name
