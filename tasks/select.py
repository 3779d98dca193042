"""Stage `select`: TAGCOS coreset selection (arXiv 2407.15235) over the gradient features.

K-means (k-means++) over the features; in every cluster, with budget B_c = floor(rate * n_c), a non-negative
ridge-regularized orthogonal matching pursuit greedily approximates the cluster centroid: add the member with
the largest positive correlation with the residual, refit the coefficients by ridge least squares (lambda =
1), drop members whose coefficient turns negative (repeated until none is), stop when the relative residual <
1e-4, a member repeats, or B_c members are chosen; if it stops early, the chosen members are set aside and OMP
reruns on the remainder until B_c are chosen (the official "fill-up"). Clusters run in parallel on Dask.
Baselines with the same sizes are written the same way: `random` and `cluster_random` (same per-cluster
budgets, random members).

The ridge system is the official one, written for A_S with members as columns: (A_S^T A_S + lambda I) x =
A_S^T b. Deviations: a dropped member never re-enters the same pass (the fill-up pass may pick it again), and
non-negativity is enforced by repeated drop-and-refit, so every `omp_weight` is >= 0.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from tracecore.configs.base import Strict
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.instructions import load_pool, pool_inputs, pool_needs
from tracecore.tasks.intervals import below_rate_p, wilson
from tracecore.tasks.plots import figure_png, subplots
from tracecore.tasks.runtime.stage import Stage, StageRun


class SelectConfig(Strict):
    """TAGCOS coreset selection: K-means, then per-cluster non-negative ridge OMP."""

    clusters: int = Field(100, ge=1)
    rate: float = Field(0.05, gt=0, le=1)
    omp_lambda: float = Field(1.0, ge=0)
    omp_tolerance: float = Field(1e-4, gt=0)
    minibatch_above: int = Field(100_000, ge=1, description="use MiniBatchKMeans above this many rows")
    baseline_draws: int = Field(3, ge=1, description="random / cluster-random draws; fine-tuning seed s uses "
                                "draw s mod baseline_draws, so intervals over seeds include selection noise")
    seed: int = 0

# `draw`: which random draw a baseline row belongs to (one per fine-tuning seed, modulo baseline_draws);
# TAGCOS rows are deterministic and all carry draw 0
CORESET_SCHEMA = pa.schema([("record_id", pa.string()), ("cluster", pa.int32()), ("omp_weight", pa.float64()),
                            ("rank", pa.int32()), ("draw", pa.int32())])


def ridge_fit(A: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
    """argmin ||A x - b||^2 + lam ||x||^2 (columns of A are the chosen members)."""
    return np.linalg.lstsq(A.T @ A + lam * np.eye(A.shape[1]), A.T @ b, rcond=None)[0]


def nonnegative_refit(A: np.ndarray, b: np.ndarray, chosen: list[int],
                      lam: float) -> tuple[list[int], np.ndarray]:
    """Ridge refit on `chosen`, dropping negative coefficients until none is left: one drop-and-refit can turn
    another coefficient negative, so a single check let negative `omp_weight`s through."""
    coef = ridge_fit(A[:, chosen], b, lam) if chosen else np.zeros(0)
    while len(coef) and (coef < 0).any():
        chosen = [c for c, w in zip(chosen, coef) if w >= 0]
        coef = ridge_fit(A[:, chosen], b, lam) if chosen else np.zeros(0)
    return chosen, coef


def omp(A: np.ndarray, b: np.ndarray, budget: int, lam: float, tol: float) -> tuple[list[int], list[float]]:
    """One non-negative ridge OMP pass over the columns of A; returns (chosen columns, coefficients)."""
    chosen: list[int] = []
    excluded = np.zeros(A.shape[1], bool)
    coef = np.zeros(0)
    residual = b.copy()
    for _ in range(4 * budget + 4):
        if len(chosen) >= budget:
            break
        corr = A.T @ residual
        corr[excluded] = -np.inf
        j = int(np.argmax(corr))
        if not np.isfinite(corr[j]) or corr[j] <= 0 or j in chosen:
            break
        chosen.append(j)
        excluded[j] = True
        chosen, coef = nonnegative_refit(A, b, chosen, lam)
        residual = b - (A[:, chosen] @ coef if chosen else 0)
        if np.linalg.norm(residual) / max(np.linalg.norm(b), 1e-12) < tol:
            break
    return chosen, [float(c) for c in coef]


def omp_fill(A: np.ndarray, b: np.ndarray, budget: int, lam: float, tol: float) -> list[tuple[int, float]]:
    """OMP, rerun on the remaining members until `budget` are chosen (official fill-up)."""
    picked: list[tuple[int, float]] = []
    remaining = np.arange(A.shape[1])
    while len(picked) < budget and len(remaining):
        cols, coefs = omp(A[:, remaining], b, budget - len(picked), lam, tol)
        if not cols:  # nothing correlates positively any more: take the closest members to the target
            order = np.argsort(-(A[:, remaining].T @ b))[: budget - len(picked)]
            cols, coefs = list(order), [0.0] * len(order)
        picked += [(int(remaining[c]), w) for c, w in zip(cols, coefs)]
        remaining = np.setdiff1d(remaining, remaining[cols])
    return picked


def relative_residual(A: np.ndarray, b: np.ndarray, lam: float) -> float:
    """How well a subset's non-negative ridge combination reproduces the centroid (lower = better)."""
    from scipy.optimize import nnls

    if A.shape[1] == 0:
        return 1.0
    augmented = np.vstack([A, math.sqrt(lam) * np.eye(A.shape[1])])
    x, _ = nnls(augmented, np.concatenate([b, np.zeros(A.shape[1])]))
    return float(np.linalg.norm(A @ x - b) / max(np.linalg.norm(b), 1e-12))


def select_cluster(store_uri: str, ref: str, shard: int, item: tuple, lam: float, tol: float, seed: int,
                   draws: int = 1) -> dict:
    """One cluster: TAGCOS picks + `draws` same-budget random picks, with their centroid residuals (the
    cluster-random residual is the mean over draws)."""
    store = ArtifactStore(store_uri)
    ids, feats, centroid, budget = item
    A = feats.T.astype(np.float64)
    picks = omp_fill(A, centroid.astype(np.float64), budget, lam, tol)
    random_cols = [sorted(np.random.default_rng([seed, shard, d]).choice(len(ids), size=budget,
                                                                         replace=False).tolist())
                   if budget else [] for d in range(draws)]
    rows = [{"record_id": ids[c], "cluster": shard, "omp_weight": w, "rank": r, "draw": 0}
            for r, (c, w) in enumerate(picks)]
    baseline = [{"record_id": ids[c], "cluster": shard, "omp_weight": None, "rank": r, "draw": d}
                for d, cols in enumerate(random_cols) for r, c in enumerate(cols)]
    table = pa.Table.from_pylist(rows + baseline, schema=CORESET_SCHEMA).append_column(
        "baseline", pa.array([False] * len(rows) + [True] * len(baseline), type=pa.bool_()))
    return store.write_shard(ref, shard, table, size=len(ids), budget=budget,
                             centroid_norm=float(np.linalg.norm(centroid)),
                             residual_tagcos=relative_residual(A[:, [c for c, _ in picks]], centroid, lam),
                             residual_cluster_random=float(np.mean(
                                 [relative_residual(A[:, cols], centroid, lam) for cols in random_cols])))


def random_draws(ids: list[str], labels: np.ndarray, size: int, seed: int, draws: int) -> pa.Table:
    """`draws` uniform random subsets of the pool, each of the coreset's size."""
    label_of = dict(zip(ids, labels.tolist()))
    rows = []
    for d in range(draws):
        chosen = sorted(np.random.default_rng([seed, d]).choice(len(ids), size, replace=False))
        rows += [{"record_id": ids[i], "cluster": label_of[ids[i]], "omp_weight": None, "rank": r, "draw": d}
                 for r, i in enumerate(chosen)]
    return pa.Table.from_pylist(rows, schema=CORESET_SCHEMA)


def cluster_features(X: np.ndarray, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    k = min(cfg.clusters, len(X))
    kind = MiniBatchKMeans if len(X) > cfg.minibatch_above else KMeans
    model = kind(n_clusters=k, init="k-means++", random_state=cfg.seed).fit(X)
    return model.labels_, model.cluster_centers_


FLAGS = {"low_quality": lambda r: r.get("quality") == "low",
         "near_duplicate": lambda r: bool(r.get("near_duplicate_of"))}


def flag_rates(pool: list[dict], ids: list[str]) -> dict[str, float]:
    """Share, count and Wilson interval of deliberately low-quality and near-duplicate records (sample-world
    flags) in a selection."""
    meta = {r["id"]: r for r in pool}
    chosen = [meta[i] for i in ids if i in meta]
    out: dict[str, float] = {}
    for flag, is_flagged in FLAGS.items():
        k = sum(map(is_flagged, chosen))
        lo, hi = wilson(k, len(chosen))
        out |= {f"{flag}_rate": k / max(len(chosen), 1), f"{flag}_k": k, f"{flag}_n": len(chosen),
                f"{flag}_lo": lo, f"{flag}_hi": hi}
    return out


def selection_rates(pool: list[dict], selections: dict[str, list[str]]) -> dict[str, dict]:
    """`flag_rates` per selection, each (but the pool) with a one-sided binomial p-value against the pool's
    rate: only a small p says a selection under-selects the flag."""
    rates = {name: flag_rates(pool, ids) for name, ids in selections.items()}
    for name, r in rates.items():
        if name != "pool":
            for flag in FLAGS:
                r[f"{flag}_p_below_pool"] = below_rate_p(r[f"{flag}_k"], r[f"{flag}_n"],
                                                         rates["pool"][f"{flag}_rate"])
    return rates


FAMILY_COLUMNS = ["family", "pool", "tagcos", "cluster_random", "random", "tagcos_records"]


def family_coverage(pool: list[dict], selections: dict[str, list[str]]) -> list[dict]:
    """Share of each instruction family in the pool and in each selection (baselines: over all their draws).
    With Zipf-sized families this is where cluster-balanced selection can differ from random: a rare family
    gets its cluster's budget instead of its share of one random draw."""
    family_of = {r["id"]: r.get("family", "all") for r in pool}
    counts = {name: Counter(family_of.get(i, "unknown") for i in ids) for name, ids in selections.items()}
    # by pool size, ties by name: a set's order changes with the process's hash seed (a resumed run differed)
    families = sorted(set().union(*counts.values()), key=lambda f: (-counts["pool"].get(f, 0), f))
    return [{"family": f,
             **{name: counts[name].get(f, 0) / max(len(ids), 1) for name, ids in selections.items()},
             "tagcos_records": counts["tagcos"].get(f, 0)} for f in families]


def cluster_size_png(sizes: list[int], budgets: list[int]) -> bytes:
    order = np.argsort(sizes)[::-1]
    fig, ax = subplots(figsize=(6, 3))
    ax.bar(range(len(sizes)), np.array(sizes)[order], label="cluster size")
    ax.bar(range(len(sizes)), np.array(budgets)[order], label="selected (budget)")
    ax.set(xlabel="cluster (by size)", ylabel="records", title="TAGCOS clusters", xticks=range(len(sizes)))
    ax.legend(fontsize=8)
    return figure_png(fig)


def run_select(run: StageRun) -> None:
    from tracecore.tasks.features import read_features

    store, cfg, log, features_ref = run.store, run.cfg, run.log, run.inputs["features"]
    refs = run.plan.refs
    ids, X = read_features(store, features_ref)
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(bad):
        raise ValueError(f"select: {len(bad)} feature rows of {features_ref} are not finite "
                         f"(records {[ids[i] for i in bad[:5]]}...); recompute the gradients stage")
    labels, centroids = cluster_features(X, cfg)
    items = []
    for c in range(len(centroids)):
        members = np.flatnonzero(labels == c)
        items.append(([ids[i] for i in members], X[members], centroids[c], int(cfg.rate * len(members))))
    work = refs["selection"]
    report = run.map("selection", select_cluster, items, lam=cfg.omp_lambda, tol=cfg.omp_tolerance,
                     seed=cfg.seed, draws=cfg.baseline_draws)
    run.commit("selection", expected_shards=len(items))
    both = store.read_table(work)
    tagcos = both.filter(pc.invert(both["baseline"])).drop_columns(["baseline"])
    cluster_random = both.filter(both["baseline"]).drop_columns(["baseline"])
    random = random_draws(ids, labels, tagcos.num_rows, cfg.seed, cfg.baseline_draws)
    pool, _ = load_pool(run.args["pool_path"])
    markers = report.markers
    selections = {name: t.column("record_id").to_pylist()
                  for name, t in (("pool", pa.table({"record_id": ids})), ("tagcos", tagcos),
                                  ("cluster_random", cluster_random), ("random", random))}
    rates = selection_rates(pool, selections)
    clusters = pa.Table.from_pylist([{"cluster": m["shard"], "size": m["size"], "budget": m["budget"],
                                      "centroid_norm": m["centroid_norm"],
                                      "residual_tagcos": m["residual_tagcos"],
                                      "residual_cluster_random": m["residual_cluster_random"]}
                                          for m in markers])
    stats = {"records": len(ids), "clusters_k": len(items), "selected": tagcos.num_rows, "rates": rates,
             "mean_residual_tagcos": float(np.mean([m["residual_tagcos"] for m in markers])),
             "mean_residual_cluster_random": float(np.mean([m["residual_cluster_random"] for m in markers])),
             "seconds": report.seconds, "skipped_shards": report.skipped}
    for name, table in (("random", random), ("cluster_random", cluster_random), ("clusters", clusters)):
        store.write_shard(refs[name], 0, table)
        run.commit(name, stats, expected_shards=1)
    run.write("families", pa.Table.from_pylist(family_coverage(pool, selections)),
              {"report_columns": FAMILY_COLUMNS})
    store.write_file(refs["coreset"], "plots/cluster_sizes.png",
                     cluster_size_png(clusters["size"].to_pylist(), clusters["budget"].to_pylist()))
    store.write_file(refs["coreset"], "rates.json", json.dumps(rates, indent=2).encode())
    run.write("coreset", tagcos, {**stats, "plots": ["plots/cluster_sizes.png"]})
    log.info("select: %d of %d records in %d clusters; centroid residual (what OMP minimises) TAGCOS %.3f vs "
             "cluster-random %.3f; low-quality rate %.3f (pool %.3f, one-sided p %.2f)", tagcos.num_rows,
             len(ids), len(items), stats["mean_residual_tagcos"], stats["mean_residual_cluster_random"],
             rates["tagcos"]["low_quality_rate"], rates["pool"]["low_quality_rate"],
             rates["tagcos"]["low_quality_p_below_pool"])


STAGE = Stage("select", SelectConfig,
              {"coreset": "coreset", "clusters": "clusters", "random": "coreset_random",
                                       "cluster_random": "coreset_cluster_random", "selection": "selection",
                                       "families": "coreset_families"}, run_select,
              needs=lambda c: {"features": "gradients.features", **pool_needs(c)}, external=pool_inputs,
              description="TAGCOS coreset: K-means + per-cluster OMP, and the random baselines")
