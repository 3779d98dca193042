"""Acceptance on the real `tiny` profile (the `make run` configuration), one full pipeline run shared.

Measured values on this profile (2 cores): QA rho 0.40, 95% CI [0.30, 0.50]; reward model accuracy 0.46 /
1.00 / 0.00 (no / correct / reversed context); TAGCOS coreset low-quality
rate 1.4% vs 4.7% in the pool, near-duplicate rate 6.9% vs 8.2%. The assertions are deliberately looser.
"""

from __future__ import annotations

import json

import pytest

from configs.schema import load_config
from storage.store import ArtifactStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    store = str(tmp_path_factory.mktemp("tiny") / "store")
    # one seed per subset and a smaller needle grid keep `make test` short; `make run` uses 3 seeds
    cfg = load_config("tiny", ["dask.processes=false", "finetune.seeds=[0]", "eval.needle_lengths=[256, 2048]",
                               "eval.needles_per_cell=1"], store=store)
    state = pipeline(config=cfg.model_dump(mode="json"), run_id="acceptance", return_state=True)
    return ArtifactStore(store), {**state.result(), "flow_run_id": state.state_details.flow_run_id}


def test_bootstrap_model_memorizes_factual_qa(tiny_run):
    store, result = tiny_run
    scores = {s["task"]: s for s in store.read_table(result["refs"]["scores"]).to_pylist()}
    qa = scores["qa"]
    assert qa["n_items"] >= 300
    assert qa["spearman"] > 0.2 and qa["spearman_lo"] > 0.1, qa
    assert qa["spearman"] > qa["infgram_spearman"]  # the task-gram LM explains the model better
    report = store.fs.cat(result["report"]).decode()
    assert "memorization_scores" in report and "rho_by_task.png" in report


def test_tagcos_coreset_under_selects_low_quality_and_near_duplicates(tiny_run):
    store, result = tiny_run
    rates = store.manifest(result["refs"]["coreset"])["rates"]
    assert rates["tagcos"]["low_quality_rate"] < rates["pool"]["low_quality_rate"], rates
    assert rates["tagcos"]["near_duplicate_rate"] < rates["pool"]["near_duplicate_rate"], rates
    clusters = store.read_table(result["refs"]["clusters"]).to_pylist()
    assert sum(c["residual_tagcos"] for c in clusters) < sum(c["residual_cluster_random"] for c in clusters)
    assert "select_cluster_sizes.png" in store.fs.cat(result["report"]).decode()


def test_context_aware_reward_model_reads_the_context(tiny_run):
    """Measured on tiny: no context 0.46, correct context 1.00, reversed context 0.00 (n = 1286 records of
    held-out reversal pairs). Asserted: no-context within 0.4-0.6 (it is ~0.5 by construction), correct
    context at least 0.3 above it, reversed context at most 0.3."""
    store, result = tiny_run
    acc = {r["setting"]: r["accuracy"] for r in store.read_table(result["refs"]["eval"]).to_pylist()
           if r["context_type"] == "all"}
    assert 0.4 <= acc["no_context"] <= 0.6, acc
    assert acc["correct_context"] >= acc["no_context"] + 0.3, acc
    assert acc["reversed_context"] <= 0.3, acc
    assert "preference_accuracy.png" in store.fs.cat(result["report"]).decode()


def test_fine_tuning_on_coresets_lowers_held_out_loss(tiny_run):
    """Measured on tiny: held-out response loss of the base model 10.9; after fine-tuning on the 5 %
    TAGCOS coreset 4.10, random 5 % 4.17, cluster-random 5 % 4.13, full pool (120 steps) 1.74."""
    store, result = tiny_run
    rows = {r["subset"]: r for r in store.read_table(result["refs"]["finetune"]).to_pylist()}
    assert set(rows) == {"tagcos", "random", "cluster_random", "full"}
    for subset in ("tagcos", "random"):
        assert rows[subset]["eval_loss"] < rows[subset]["eval_loss_base"] - 1.0, rows[subset]
    assert rows["full"]["eval_loss"] < rows["random"]["eval_loss"]  # 20x the data (capped steps) still helps
    assert "finetune_finetune_loss.png" in store.fs.cat(result["report"]).decode()


def test_eval_tables_and_razor_kv_savings(tiny_run):
    """Measured on tiny at 2048 tokens (8x the trained length): RazorAttention keeps 22.7 % of the KV
    bytes (1 of 9 KV heads is a retrieval head). Needle accuracy is 0 for every method: the bootstrap
    model has no induction heads (probe scores ~0.01), so it cannot retrieve at any length (README)."""
    store, result = tiny_run
    refs = result["refs"]
    summary = {(r["method"], r["length"]): r for r in store.read_table(refs["eval_long_context"]).to_pylist()}
    assert summary[("razor", 2048)]["kv_vs_full"] <= 0.3, summary[("razor", 2048)]
    assert summary[("rag_top1", 2048)]["tokens_in_context"] < 200
    verdict = {(r["subset"], r["metric"]) for r in store.read_table(refs["eval_verdict"]).to_pylist()}
    assert ("tagcos-random", "instruction_loss") in verdict and ("full", "perplexity") in verdict
    quality = store.read_table(refs["eval_quality"]).to_pylist()
    assert len(quality) == 5  # base + 4 subsets x 1 seed
    report = store.fs.cat(result["report"]).decode()
    assert "needle_heatmaps.png" in report and "retrieval_heads.png" in report and "eval_verdict" in report


def test_prefect_artifacts_of_every_stage_read_back_from_the_server(tiny_run):
    """What the UI shows for this run, read through the Prefect client: every stage's outputs table (equal
    to the store's row counts), a progress artifact at 100 % for every shard loop and pretraining, the
    plots, and the summary markdown naming the artifact store."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from configs.schema import STAGES

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
    loops = ["ingest", "dedup", "tokenize", "pretrain", "ngram-index", "ngram-map", "ngram-reduce", "memorization",
             "gradients", "select", "preference", "finetune", "eval"]
    for loop in loops:
        assert latest[f"tracecore-{loop}-progress"].data == 100.0, loop
    for plot in ("tracecore-pretrain-loss", "tracecore-select-cluster-sizes", "tracecore-eval-needle-heatmaps"):
        assert "data:image/png;base64," in latest[plot].data
    assert str(store.display_path("")).rstrip("/") in latest["tracecore-pipeline-summary"].data
