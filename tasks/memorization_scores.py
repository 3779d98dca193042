"""Memorization scores: per-item task-gram and LM log-probabilities -> rank correlations with bootstrap
intervals per (model, task). Separate from the stage so the statistics read (and are tested) on their own."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the type only: the stage's config is not code this library runs
    from tracecore.tasks.memorization import MemorizationConfig


def correlations(lm: np.ndarray, ref: np.ndarray, n_boot: int, seed: int,
                 groups: np.ndarray | None = None) -> dict:
    """Spearman and Pearson with percentile bootstrap CIs, Kendall tau distance = (1 - tau) / 2 (a point
    value, as the paper reports it). With `groups` (an item id per row), whole items are resampled: rows of
    one item (translation's five targets) are not independent, and resampling rows made intervals too narrow.
    Resamples are drawn and ranked as one array where they have one width (one at a time was slow); a resample
    where
    either side is constant has no correlation and is skipped."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    result = {"kendall_tau_distance": (1 - stats.kendalltau(lm, ref).statistic) / 2,
              "spearman": stats.spearmanr(lm, ref).statistic, "pearson": stats.pearsonr(lm, ref).statistic,
              "bootstrap_units": int(len(np.unique(groups)) if groups is not None else len(lm))}
    boots: dict[str, list] = {"spearman": [], "pearson": []}
    for idx in resample_index(len(lm), n_boot, rng, groups):
        a, b = lm[idx], ref[idx]
        varied = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)
        a, b = a[varied], b[varied]
        boots["spearman"] += list(_rowwise_pearson(stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)))
        boots["pearson"] += list(_rowwise_pearson(a, b))
    for name, values in boots.items():
        ok = np.array(values)[np.isfinite(values)] if values else np.array([])
        result |= {f"{name}_lo": float(np.percentile(ok, 2.5)) if len(ok) else float("nan"),
                   f"{name}_hi": float(np.percentile(ok, 97.5)) if len(ok) else float("nan")}
    return result


def resample_index(n: int, n_boot: int, rng, groups: np.ndarray | None) -> list[np.ndarray]:
    """Row indices of the bootstrap resamples as [resamples, rows] arrays: by row, or by whole group (one
    array when every group has the same size, else one array per resample)."""
    if groups is None:
        return [rng.integers(0, n, (n_boot, n))]  # the same draws as n_boot sequential calls
    keys, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(keys))]
    drawn = rng.integers(0, len(keys), (n_boot, len(keys)))
    if len({len(m) for m in members}) == 1:
        return [np.stack(members)[drawn].reshape(n_boot, -1)]
    return [np.concatenate([members[g] for g in row])[None, :] for row in drawn]


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def item_scores(pairs: list[dict]) -> list[dict]:
    """One row per (task, item, s_y). `log_p_t`: mean log P_T over its co-occurring pairs (the official
    aggregation; NaN when none co-occurs). `log_p_t_smoothed`: mean over all its pairs of
    log((C(s_x, s_y) + 1/|Y|) / (C(s_x) + 1)), |Y| = the task's distinct y-grams: a prior of one pseudo-count
    spread uniformly over the targets, so an unseen s_x gives 1/|Y|, a zero co-occurrence ranks below every
    observed one, and large counts keep the plain estimate. An item whose pairs never co-occur thus keeps a
    rank instead of leaving the correlation."""
    targets: dict[str, set] = {}
    for p in pairs:
        targets.setdefault(p["task"], set()).add(p["s_y"])
    grouped: dict[tuple, list[dict]] = {}
    for p in pairs:
        grouped.setdefault((p["task"], p["item_id"], p["s_y"]), []).append(p)
    rows = []
    for (task, item_id, s_y), group in grouped.items():
        logs = [math.log(p["c_xy"] / p["c_x"]) for p in group if p["c_x"] and p["c_xy"]]
        prior = 1 / len(targets[task])
        smoothed = [min(0.0, math.log((p["c_xy"] + prior) / (p["c_x"] + 1))) for p in group]
        rows.append({"task": task, "item_id": item_id, "s_y": s_y, "input": group[0]["input"],
                     "prompt": group[0]["prompt"],
                     "frequency": group[0]["frequency"], "pairs": len(group),
                     "pairs_zero": len(group) - len(logs),
                     "pair_count": sum(p["c_xy"] for p in group), "approx": any(p["approx"] for p in group),
                     "cooccurring": bool(logs), "log_p_t": float(np.mean(logs)) if logs else float("nan"),
                     "log_p_t_smoothed": float(np.mean(smoothed)), "log_p_inf": group[0]["log_p_inf"]})
    return rows


def score_table(rows: list[dict], cfg: MemorizationConfig) -> list[dict]:
    """Per model and task: memorization rho over co-occurring items (the paper's: P_T needs C(s_x, s_y) > 0)
    and over all items (smoothed P_T), generalization (tau distance), the inf-gram baseline."""
    out = []
    for (model, task), group in itertools.groupby(sorted(rows, key=lambda r: (r["model"], r["task"])),
                                                  key=lambda r: (r["model"], r["task"])):
        group = list(group)
        seen = [r for r in group if math.isfinite(r["log_p_t"])]
        row = {"model": model, "task": task, "parameters": group[0]["parameters"], "n_all": len(group),
               "n_cooccurring": len(seen), "items_all": len({r["item_id"] for r in group}),
               "items_cooccurring": len({r["item_id"] for r in seen})}
        lm_all = np.array([r["log_p_lm"] for r in group])
        items_all = np.array([str(r["item_id"]) for r in group])
        if len(group) >= 3:
            every = correlations(lm_all, np.array([r["log_p_t_smoothed"] for r in group]), cfg.bootstrap,
                                 cfg.seed, items_all)
            row |= {"spearman_all": every["spearman"], "spearman_all_lo": every["spearman_lo"],
                    "spearman_all_hi": every["spearman_hi"]}
        if len(seen) >= 3:
            lm = np.array([r["log_p_lm"] for r in seen])
            items = np.array([str(r["item_id"]) for r in seen])
            scores = correlations(lm, np.array([r["log_p_t"] for r in seen]), cfg.bootstrap, cfg.seed, items)
            baseline = correlations(lm, np.array([r["log_p_inf"] for r in seen]), cfg.bootstrap, cfg.seed,
                                    items)
            row |= {**scores, "infgram_spearman": baseline["spearman"],
                    "infgram_spearman_lo": baseline["spearman_lo"],
                    "infgram_spearman_hi": baseline["spearman_hi"]}
        out.append(row)
    return out
