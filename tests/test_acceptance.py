"""Acceptance: every effect the pipeline claims, asserted on one shared pipeline run.

`make test` runs it on the reduced acceptance profile (tests/profile_accept.yaml: the tiny recipe at about a
third of the cost, 202 s on 2 cores here); `make test-accept` (TRACECORE_ACCEPT=full) runs the
same assertions on the real `tiny` profile with its 3 seeds, as `make run` does (~25 min there), before a
release; with TRACECORE_ACCEPT_STORE=<store of a `make run`> it reuses that run's artifacts. Measured values
are in the README; the assertions are deliberately looser.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.registry import load_config

FULL = os.environ.get("TRACECORE_ACCEPT") == "full"
PROFILE = "tiny" if FULL else str(Path(__file__).parent / "profile_accept.yaml")
MIN_QA_ITEMS = 300 if FULL else 150  # tiny scores 400 QA items, the reduced profile 200
# the shared run is timed in the first test: reduced 202 s on 2 cores, 351 s on one (2026-11-26): 3.4x margin
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * 3600 if FULL else 1200)]


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, tmp_path_factory):
    from tracecore.flows.pipeline import pipeline

    # TRACECORE_ACCEPT_STORE: check a store `make run` filled (its stages are reused, the assertions run)
    store = os.environ.get("TRACECORE_ACCEPT_STORE") or str(tmp_path_factory.mktemp("accept") / "store")
    cfg = load_config(PROFILE, ["dask.processes=false"], store=store)
    state = pipeline(config=cfg.model_dump(mode="json"), run_id="acceptance", return_state=True)
    return ArtifactStore(store), {**state.result(), "flow_run_id": state.state_details.flow_run_id}


def test_bootstrap_model_memorizes_factual_qa(tiny_run):
    store, result = tiny_run
    rows = store.read_table(result["refs"]["memorization.scores"]).to_pylist()
    scores = {s["task"]: s for s in rows if s["model"].startswith("model/")}  # the run's own model
    qa = scores["qa"]
    assert qa["n_cooccurring"] >= MIN_QA_ITEMS and qa["n_all"] >= qa["n_cooccurring"]
    assert -1 <= qa["spearman_lo"] <= qa["spearman"] <= qa["spearman_hi"] <= 1, qa
    if FULL:  # tiny: rho 0.43 [0.32, 0.52]; the reduced profile's smaller model reads -0.20 under the prompt
        # template ("Question: x\nAnswer:"), which its corpus never shows (README): reported, not asserted
        # there
        assert qa["spearman"] > 0.2 and qa["spearman_lo"] > 0.1, qa
        assert qa["spearman"] > qa["infgram_spearman"]  # the task-gram LM explains the model better
    assert qa["corpus_share_seen"] >= 0.9, qa  # the model saw (nearly) the whole index its counts come from
    if FULL:  # tiny scores SmolLM2 too: pretrained elsewhere, so no share of this corpus (its rho is overlap)
        smol = {s["task"]: s for s in rows if s["model"] == "smollm2-135m-instruct"}
        assert set(smol) == set(scores) and all(s["corpus_share_seen"] is None for s in smol.values()), smol
    report = store.fs.cat(result["report"]).decode()
    assert "memorization_scores" in report and "rho_by_task.png" in report


def test_tagcos_selection_rates_are_reported_with_intervals_and_a_test_against_the_pool(tiny_run):
    """The default run's TAGCOS flag rates are not significantly below the pool's (3 of 96 low-quality vs 4.9
    expected, p ~ 0.27), so no under-selection is asserted: the table carries each rate's Wilson interval
    and its one-sided binomial p against the pool rate, and an under-selection claim needs p < 0.05. The
    centroid residual is what OMP minimises, so TAGCOS beating cluster-random there is the method working,
    not evidence of quality; it is checked as such."""
    from scipy.stats import binomtest

    store, result = tiny_run
    rates = store.manifest(result["refs"]["select.coreset"])["rates"]
    for name in ("tagcos", "cluster_random", "random"):
        for flag in ("low_quality", "near_duplicate"):
            r, pool = rates[name], rates["pool"][f"{flag}_rate"]
            assert 0 <= r[f"{flag}_lo"] <= r[f"{flag}_rate"] <= r[f"{flag}_hi"] <= 1, r
            expected = binomtest(r[f"{flag}_k"], r[f"{flag}_n"], pool, alternative="less").pvalue
            assert abs(r[f"{flag}_p_below_pool"] - expected) < 1e-9, r
    clusters = store.read_table(result["refs"]["select.clusters"]).to_pylist()
    assert sum(c["residual_tagcos"] for c in clusters) < sum(c["residual_cluster_random"] for c in clusters)
    report = store.fs.cat(result["report"]).decode()
    assert "select_cluster_sizes.png" in report


def test_context_aware_reward_model_reads_the_context(tiny_run):
    """Held-out prompts under the training phrasings: the context-aware model follows the context where the
    context-blind one cannot; factual pairs are right without context. The held-out phrasings are balanced
    per pole, so the blind model's chance line is 0.5 and joint reversal's 0.25 (a coin per record). On tiny
    (the default run), new wordings too: a significant gap over the blind model and joint reversal above its
    chance line. Which context type transfers varies with the base model (README), so none is asserted."""
    store, result = tiny_run
    acc = {(r["metric"], r["model"], r["context_type"]): r
           for r in store.read_table(result["refs"]["preference.accuracy"]).to_pylist()}
    seen_aware = acc[("context_conditioned_seen_phrasing", "context_aware", "all")]
    seen_blind = acc[("context_conditioned_seen_phrasing", "context_blind", "all")]
    assert seen_aware["lo"] > seen_blind["hi"] and seen_aware["accuracy"] >= seen_blind["accuracy"] + 0.2, acc
    assert acc[("no_context_unconditional", "context_aware", "all")]["accuracy"] >= 0.8, acc
    for key in (("context_conditioned", "context_aware", "all"),
                ("context_conditioned", "context_blind", "all"), ("joint_reversal", "context_aware", "all")):
        assert acc[key]["n"] >= 50, acc[key]
        assert 0 <= acc[key]["lo"] <= acc[key]["accuracy"] <= acc[key]["hi"] <= 1, acc[key]
        assert acc[key]["blind_ceiling"] == (0.0 if key[0] == "joint_reversal" else 0.5), acc[key]
    if FULL:
        aware = acc[("context_conditioned", "context_aware", "all")]
        blind = acc[("context_conditioned", "context_blind", "all")]
        assert aware["lo"] > blind["hi"] and aware["accuracy"] >= blind["accuracy"] + 0.1, acc
        joint = acc[("joint_reversal", "context_aware", "all")]
        assert joint["lo"] > joint["chance"], joint
    assert "preference_accuracy.png" in store.fs.cat(result["report"]).decode()


def test_fine_tuning_on_coresets_lowers_held_out_loss(tiny_run):
    """Held-out response loss falls by more than a nat after fine-tuning on a 5 % coreset, and the full pool
    (capped steps) beats 5 % (README: measured values per profile)."""
    store, result = tiny_run
    rows = {r["subset"]: r for r in store.read_table(result["refs"]["finetune.finetune"]).to_pylist()
            if r["seed"] == 0}
    assert set(rows) == {"tagcos", "random", "cluster_random", "full"}
    for subset in ("tagcos", "random"):
        assert rows[subset]["eval_loss"] < rows[subset]["eval_loss_base"] - 1.0, rows[subset]
    assert rows["full"]["eval_loss"] < rows["random"]["eval_loss"]  # 20x the data (capped steps) still helps
    assert "finetune_finetune_loss.png" in store.fs.cat(result["report"]).decode()


def test_eval_tables_and_razor_kv_savings(tiny_run):
    """At the longest needle length RazorAttention keeps under 30 % of the KV bytes (1 of 6 KV heads is a
    retrieval head). Needle accuracy is 0 for every method: the bootstrap model has no induction heads (probe
    scores ~0.01), so it cannot retrieve at any length (README; `make test-long` covers retrieval)."""
    store, result = tiny_run
    refs = result["refs"]
    summary = {(r["method"], r["length"]): r for r in store.read_table(refs["eval.long_context"]).to_pylist()}
    longest = max(length for _, length in summary)
    assert summary[("razor", longest)]["kv_vs_full"] <= 0.3, summary[("razor", longest)]
    assert summary[("rag_top1", longest)]["tokens_in_context"] < 200
    verdict = {(r["subset"], r["metric"]) for r in store.read_table(refs["eval.verdict"]).to_pylist()}
    assert ("tagcos-random", "instruction_loss") in verdict and ("full", "perplexity") in verdict
    quality = store.read_table(refs["eval.quality"]).to_pylist()
    finetune = load_config(PROFILE).finetune
    seeds = len(finetune.seeds)
    # base + 3 subsets x seeds + full
    assert len(quality) == 1 + 3 * seeds + min(seeds, finetune.full_seeds or seeds)
    report = store.fs.cat(result["report"]).decode()
    assert "needle_heatmaps.png" in report and "retrieval_heads.png" in report and "eval_verdict" in report


def test_a_real_pretrained_model_retrieves_and_razor_keeps_under_a_third_of_the_kv(tiny_run):
    """SmolLM2-135M-Instruct (from its package): full attention's needle accuracy per length with intervals
    (whatever it is) and RazorAttention's KV bytes, measured from the caches, <= 30 % of full attention's at
    every length. Razor's accuracy against full attention's and the probe's heads against random heads of
    the same count are reported (`razor_checks`, with a note when random heads do as well), not asserted:
    on the default run Razor trails full attention at 1k and 2k (README), which is the finding."""
    store, result = tiny_run
    ref = result["refs"]["eval.long_context_models"]
    summary = {(r["model"], r["method"], r["length"]): r for r in store.read_table(ref).to_pylist()}
    lengths = sorted({length for model, _, length in summary if model == "smollm2_135m"})
    assert lengths, summary
    for length in lengths:
        full, razor = summary[("smollm2_135m", "full", length)], summary[("smollm2_135m", "razor", length)]
        assert full["needles"] >= 2 and 0 <= full["lo"] <= full["accuracy"] <= full["hi"] <= 1, full
        assert razor["kv_vs_full"] <= 0.3 and full["kv_vs_full"] == 1.0, (razor, full)
        assert ("smollm2_135m", "rag_top1", length) in summary
    assert summary[("smollm2_135m", "full", lengths[0])]["accuracy"] > 0  # a real model retrieves
    checks = store.manifest(ref)["razor_checks"]
    assert {c["length"] for c in checks} == set(lengths)
    assert all((c["probe_minus_random_heads"] > 0) == (c["note"] == "") for c in checks), checks
    report = store.fs.cat(result["report"]).decode()
    assert "needle_smollm2_135m.png" in report and "retrieval_heads_smollm2_135m.png" in report


def test_per_family_selection_table_with_intervals_over_seeds(tiny_run):
    """Zipf-sized families: TAGCOS, random and cluster-random per held-out family, with the pool share and
    intervals over seeds, and TAGCOS - random paired by seed (which way it comes out is the finding;
    README)."""
    store, result = tiny_run
    rows = store.read_table(result["refs"]["eval.families"]).to_pylist()
    shares = {r["family"]: r["pool_share"] for r in rows}
    assert len(shares) == 8 and max(shares.values()) / min(shares.values()) >= 4  # Zipf, not uniform
    seeds = len(load_config(PROFILE).finetune.seeds)
    for subset in ("tagcos", "random", "cluster_random", "tagcos-random"):
        sel = [r for r in rows if r["subset"] == subset]
        assert len(sel) == 8 and all(r["seeds"] == seeds for r in sel), subset
        for r in sel:
            assert r["loss_lo"] <= r["loss"] <= r["loss_hi"]
            assert r["accuracy_lo"] <= r["accuracy"] <= r["accuracy_hi"]
            if subset != "tagcos-random":
                assert r["loss_lo"] > 0 and 0 <= r["accuracy_lo"] and r["accuracy_hi"] <= 1
    assert any(r["loss_hi"] > r["loss_lo"] for r in rows)  # seeds differ: real intervals
    assert "eval_families" in store.fs.cat(result["report"]).decode()


def test_prefect_artifacts_of_every_stage_read_back_from_the_server(tiny_run):
    """What the UI shows for this run, read through the Prefect client: every stage's outputs table (equal
    to the store's row counts), a progress artifact at 100 % for every shard loop and pretraining, the
    plots, and the summary markdown naming the artifact store."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from tracecore.tasks.runtime.registry import STAGES

    store, result = tiny_run
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[result["flow_run_id"]])))
    latest = {a.key: a for a in sorted(found, key=lambda a: a.created)}
    for stage in STAGES:
        table = latest[f"tracecore-{stage}-outputs"].data
        rows = json.loads(table) if isinstance(table, str) else table
        for row in rows:
            assert row["rows"] == sum(m["rows"] for m in store.markers(row["artifact"])), row
    from tracecore.storage.runs import read_run

    # progress and plots come from the stages this run computed (all of them, unless TRACECORE_ACCEPT_STORE
    # pointed at a filled store whose stages were reused)
    computed = {s for s, info in read_run(store, "acceptance")["stages"].items()
                if info["status"] == "computed"}
    loops = {"ingest-parsed": "ingest", "ingest": "ingest", "tokenize": "tokenize", "pretrain": "pretrain",
             "ngram-index": "ngram", "ngram-counts-map": "ngram", "ngram-counts": "ngram",
             "memorization-pairs": "memorization", "gradients": "gradients", "select-selection": "select",
             "preference-parsed": "preference", "preference-rm-scores": "preference", "finetune": "finetune",
             "eval-quality": "eval"}
    assert os.environ.get("TRACECORE_ACCEPT_STORE") or computed == set(STAGES), computed
    for loop, stage in loops.items():
        if stage in computed:
            assert latest[f"tracecore-{loop}-progress"].data == 100.0, loop
    for plot, stage in (("tracecore-pretrain-loss", "pretrain"), ("tracecore-select-cluster-sizes", "select"),
                        ("tracecore-eval-needle-heatmaps", "eval")):
        if stage in computed:
            assert "data:image/png;base64," in latest[plot].data
    assert str(store.display_path("")).rstrip("/") in latest["tracecore-pipeline-summary"].data


def test_readme_tables_are_rendered_from_the_run(tiny_run, tmp_path):
    """The README's and the docs' measured tables are generated (`tracecore readme`), so they cannot go stale:
    every block renders from this run and holds its numbers; on the full profile the files already hold
    them."""
    import re

    from conftest import run_cli
    from tracecore.flows.cli import block_files
    from tracecore.flows.readme import BLOCK, RENDERERS, update_readme
    from tracecore.storage.runs import read_run

    store, result = tiny_run
    root = Path(__file__).parents[1]
    files = [root / p for p in block_files(None, root)]
    texts = {f: f.read_text() for f in files}
    names = {m["name"] for text in texts.values() for m in BLOCK.finditer(text)}
    assert {"headline", "timings", "verdict", "families", "selection_quality", "memorization", "reward_model",
            "long_context"} <= names <= set(RENDERERS)
    record = read_run(store, "acceptance")
    rendered, changed = {}, []
    for f, text in texts.items():
        rendered[f], names_changed = update_readme(text, store, record)
        changed += names_changed
    blocks = {m["name"]: m["body"] for text in rendered.values() for m in BLOCK.finditer(text)}
    verdict = {(r["subset"], r["metric"]): r
               for r in store.read_table(result["refs"]["eval.verdict"]).to_pylist()}
    assert f"{verdict[('tagcos', 'instruction_loss')]['mean']:.3f}" in blocks["verdict"]
    difference = verdict[("tagcos-random", "instruction_loss")]["mean"]
    assert f"{difference:.3f}".replace("-", "−") in blocks["headline"]
    assert f"{record['calibration']['matmul_gflops']:.0f} GFLOP/s" in blocks["timings"]
    assert re.search(r"\*\*whole run\*\* \| \*\*\d+\*\*", blocks["timings"])
    if FULL:  # deterministic results: only the machine-dependent timings may differ from the files
        assert set(changed) <= {"timings"}, changed
    copies = []
    for f, text in texts.items():
        copy = tmp_path / f.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
        copies += ["--readme", str(copy)]
    assert run_cli("readme", "acceptance", "--store", store.uri, *copies).returncode == 0
    for f in files:
        assert (tmp_path / f.relative_to(root)).read_text() == rendered[f]
    check = run_cli("readme", "acceptance", "--store", store.uri, *copies, "--check")
    assert check.returncode == 0, check.stdout + check.stderr
