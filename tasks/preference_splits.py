"""How the preference dataset is split: prompts by a hash, context phrasings held out balanced per pole.

Apart from `tasks/preference.py` because the split decides what every reported accuracy means: a held-out
set whose wordings favour one side rewards (or punishes) a context-blind model's side preference, so it
is its own reviewed unit with its own tests (`tests/test_preference.py`).
"""

from __future__ import annotations

import hashlib
import json

from tracecore.tasks.text import normalize_text


def hash_split(key: str, test_fraction: float) -> str:
    """A deterministic split by a hash of `key`: the same key lands on the same side in every run."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


def split_of(prompt: str, test_fraction: float, seed: int) -> str:
    return hash_split(f"{seed}|{prompt}", test_fraction)


def context_poles(pairs: list[dict], library: list[dict]) -> tuple[dict[str, tuple[str, int]], int]:
    """Each context's (axis, pole), keyed by its normalised text: a pair's own contexts that prefer the same
    response share a pole and opposite ones are the two poles of one axis (union-find with parity); library
    entries of one feature are one axis, poled by `prefers`, and are linked by that alone (on a pair without
    own contexts several features meet, and their relative sides vary from pair to pair). Returns the map and
    the number of links that contradicted earlier ones (skipped)."""
    parent: dict[str, tuple[str, int]] = {}

    def find(x: str) -> tuple[str, int]:
        root, parity = x, 0
        while parent.setdefault(root, (root, 0))[0] != root:
            root, step = parent[root]
            parity ^= step
        parent[x] = (root, parity)
        return root, parity

    def link(x: str, y: str, opposite: bool) -> bool:
        (rx, px), (ry, py) = find(x), find(y)
        if rx == ry:
            return px ^ py == opposite
        parent[rx] = (ry, px ^ py ^ opposite)
        return True

    conflicts = 0
    for feature in {e["feature"] for e in library}:
        entries = [e for e in library if e["feature"] == feature]
        for e in entries[1:]:
            link(normalize_text(e["context"]), normalize_text(entries[0]["context"]),
                 e["prefers"] != entries[0]["prefers"])
    used = set()
    for pair in pairs:
        contexts = [(normalize_text(c), side, src) for c, _, side, src in json.loads(pair["contexts"])]
        used.update(t for t, _, _ in contexts)
        own = [(t, side) for t, side, src in contexts if src != "library"]
        conflicts += sum(not link(t, own[0][0], side != own[0][1]) for t, side in own[1:])
    return {t: find(t) for t in sorted(used)}, conflicts


def heldout_phrasings(pairs: list[dict], library: list[dict],
                      fraction: float) -> tuple[set[str], dict[str, int]]:
    """Normalised texts of the held-out phrasings, as many from each pole of every (axis, context type): then
    every context-blind scorer scores chance on them (a hash of the wording alone held out one pole's
    phrasings more often than the other's, and the blind model's training-side bias set its score). Per
    stratum k = round(fraction x the smaller pole), at least 1 when both poles have two phrasings or more;
    with one on a pole, the stratum is held out whole (one per pole) or kept by a hash of its phrasings; a
    one-pole stratum
    (no reversal: e.g., "correct facts matter") is never held out. Within a pole, the first k by a hash."""
    poles, conflicts = context_poles(pairs, library)
    types = {normalize_text(c): t for p in pairs for c, t, _, _ in json.loads(p["contexts"])}
    strata: dict[tuple, list[list[str]]] = {}
    for text, (axis, pole) in poles.items():
        strata.setdefault((axis, types[text]), [[], []])[pole].append(text)

    def by_hash(texts: list[str]) -> list[str]:
        return sorted(texts, key=lambda t: hashlib.sha256(f"context|{t}".encode()).hexdigest())

    held = set()
    for sides in strata.values():
        smaller = min(map(len, sides))
        k = max(1, round(fraction * smaller)) if smaller >= 2 else (
            smaller if hash_split("|".join(by_hash(sides[0] + sides[1])), fraction) == "test" else 0)
        held.update(t for side in sides for t in by_hash(side)[:k])
    return held, {"context_axes": len({a for a, _ in strata}), "context_pole_conflicts": conflicts,
                  "heldout_phrasings": len(held)}
