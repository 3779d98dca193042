"""Stage `eval` on the test profile: quality per checkpoint, verdict with intervals, long-context tables."""

from __future__ import annotations

import math

import pytest
from tracecore.flows.pipeline import execute_stage
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.eval import family_verdict, interval, verdict


@pytest.fixture(scope="module")
def evaluated(pretrained):
    cfg, refs = pretrained
    refs = dict(refs)
    config = cfg.model_dump(mode="json")
    config["finetune"] = {**config["finetune"], "subsets": ["tagcos", "random"], "seeds": [0, 1],
                          "max_steps": 4}
    for stage in ("ngram", "gradients", "select", "preference", "finetune", "eval"):
        refs.update(execute_stage(stage, config))
    return ArtifactStore(cfg.store), cfg, refs


def test_quality_row_per_checkpoint(evaluated):
    store, _, refs = evaluated
    rows = {r["model"]: r for r in store.read_table(refs["eval.quality"]).to_pylist()}
    assert set(rows) == {"base", "tagcos_s0", "tagcos_s1", "random_s0", "random_s1"}
    for r in rows.values():
        assert r["perplexity"] > 1 and math.isfinite(r["perplexity"])
        assert 0 <= r["qa_accuracy"] <= 1 and 0 <= r["mc_accuracy"] <= 1 and 0 <= r["translation_chrf"] <= 100
        assert r["instruction_loss"] > 0 and 0 <= r["instruction_accuracy"] <= 1
    assert rows["tagcos_s0"]["instruction_loss"] < rows["base"]["instruction_loss"]


def test_verdict_has_intervals_over_seeds_and_the_paired_difference(evaluated):
    store, _, refs = evaluated
    rows = store.read_table(refs["eval.verdict"]).to_pylist()
    subsets = {r["subset"] for r in rows}
    assert subsets == {"tagcos", "random", "tagcos-random"}
    for r in rows:
        assert r["seeds"] == 2 and r["lo"] <= r["mean"] <= r["hi"]


def test_interval_and_paired_difference_values():
    mean, lo, hi = interval([1.0, 2.0, 3.0], 0.95)
    assert mean == 2.0 and math.isclose(hi - mean, 4.303 / math.sqrt(3),
                                        rel_tol=1e-3) and math.isclose(mean - lo, hi - mean)
    rows = [{"subset": s, "seed": k, **dict.fromkeys(
        ["perplexity", "qa_accuracy", "mc_accuracy", "translation_chrf", "instruction_loss",
         "instruction_accuracy"],
        v + k)} for s, v in (("tagcos", 1.0), ("random", 3.0)) for k in (0, 1, 2)]
    diff = [r for r in verdict(rows, 0.95) if r["subset"] == "tagcos-random"]
    assert all(r["mean"] == -2.0 and r["lo"] == r["hi"] == -2.0 for r in diff)  # paired: no seed noise


def test_family_verdict_per_family_and_subset_with_the_paired_difference():
    """Each family's held-out loss and accuracy per subset over seeds, and TAGCOS - random paired by seed: the
    table in which cluster-balanced selection can show on rare families."""
    import json

    rows = [{"subset": s, "seed": k, "family_loss": json.dumps({"rare": base + k + 1.0, "common": base + k}),
             "family_accuracy": json.dumps({"rare": 0.1 * k, "common": 0.9})}
            for s, base in (("tagcos", 1.0), ("random", 1.5)) for k in (0, 1, 2)]
    table = family_verdict(rows, 0.95, {"rare": 0.05, "common": 0.95})
    assert {(r["family"], r["subset"]) for r in table} == {(f, s) for f in ("rare", "common")
                                                           for s in ("tagcos", "random", "tagcos-random")}
    diff = {r["family"]: r for r in table if r["subset"] == "tagcos-random"}
    # paired by seed
    assert diff["rare"]["loss"] == diff["rare"]["loss_lo"] == diff["rare"]["loss_hi"] == -0.5
    rare = next(r for r in table if r["family"] == "rare" and r["subset"] == "tagcos")
    assert rare["pool_share"] == 0.05 and rare["seeds"] == 3 and 0 <= rare["accuracy_lo"] <= rare["accuracy"]
    # log scale: stays positive
    assert rare["loss_lo"] < rare["loss"] < rare["loss_hi"] and rare["loss_lo"] > 0


def test_family_table_is_written_for_the_default_verdict(evaluated):
    store, _, refs = evaluated
    rows = store.read_table(refs["eval.families"]).to_pylist()
    assert {r["subset"] for r in rows} == {"tagcos", "random", "tagcos-random"}
    assert len({r["family"] for r in rows}) >= 2 and all(r["seeds"] == 2 for r in rows)


def test_every_checkpoints_generations_are_traced_to_documents_that_hold_the_spans(evaluated):
    """Greedy generations on held-out prompts (none in the fine-tuning pool), each span listed with
    documents whose text holds it, the stored coverage equal to tracing the generation again, and the share
    per checkpoint inside its interval inside [0, 1]."""
    import json

    from tracecore.tasks import index_query as query
    from tracecore.tasks.instructions import load_pool
    from tracecore.tasks.output_trace import trace_output

    store, cfg, refs = evaluated
    rows = store.read_table(refs["eval.generation_traces"]).to_pylist()
    models = {r["model"] for r in store.read_table(refs["eval.quality"]).to_pylist()}
    assert {r["model"] for r in rows} == models and len(rows) == len(models) * cfg.eval.output_trace.prompts
    pool = load_pool(planned_pool(cfg))[0]
    prompts = {f"{p['instruction']} {p.get('input', '')}".strip() for p in pool}
    assert not prompts & {r["prompt"] for r in rows}
    texts = {d["id"]: d["text"] for d in store.read_table(refs["ingest.documents"]).to_pylist()}
    s = cfg.eval.output_trace
    with query.opened(store, refs["ngram.index"]) as (engine, tok):
        for r in rows:
            again = trace_output(store, refs["ngram.index"], engine, tok, r["generation"], s.min_span,
                                 s.max_span_count, s.max_docs)
            assert r["covered"] == again["covered"] and json.loads(r["trace"]) == again["spans"]
            for span in again["spans"]:
                assert span["tokens"] >= s.min_span and all(span["text"] in texts[d["id"]]
                                                            for d in span["documents"])
    # the test profile's one-layer models emit blanks; a corpus sentence as a "generation" has spans
    from tracecore.tasks.eval_traces import trace_rows

    sentence = next(iter(texts.values()))[:160]
    row = trace_rows(store, refs["ngram.index"], {"model": "m", "subset": "s", "seed": 0},
                     [{"instruction": "say", "input": ""}], [sentence], cfg.eval)[0]
    assert row["spans"] >= 1 and row["covered"] > 0.5 and row["longest_span"] >= s.min_span
    summary = store.read_table(refs["eval.creativity"]).to_pylist()
    assert {x["model"] for x in summary} == models
    assert all(0 <= x["lo"] <= x["covered"] <= x["hi"] <= 1 for x in summary)
    assert store.read_file(refs["eval.creativity"], "plots/output_coverage.png")[:4] == b"\x89PNG"


def planned_pool(cfg) -> str:
    from conftest import planned_args

    return planned_args(cfg, "gradients")["pool_path"]


def test_long_context_tables_heads_and_plots(evaluated):
    store, cfg, refs = evaluated
    grid = store.read_table(refs["eval.needle"]).to_pylist()
    methods = {r["method"] for r in grid}
    assert methods == {"full", "razor", "longcache", "rag_top1", "rag_top2"}
    assert len(grid) == len(methods) * 2 * 3
    summary = {(r["method"], r["length"]): r for r in store.read_table(refs["eval.long_context"]).to_pylist()}
    # the test model has one KV head, which is then the retrieval head: Razor keeps everything here
    # (compression itself is tested in test_long_context_kernels; the tiny acceptance run checks >= 70 %)
    assert summary[("razor", 256)]["kv_vs_full"] == summary[("full", 256)]["kv_vs_full"] == 1.0
    assert summary[("rag_top1", 256)]["tokens_in_context"] < summary[("full", 256)]["tokens_in_context"]
    heads = store.read_table(refs["eval.heads"]).to_pylist()
    assert len(heads) == cfg.pretrain.layers * cfg.pretrain.kv_heads and any(h["retrieval"] for h in heads)
    assert store.manifest(refs["eval.heads"])["plots"] == ["plots/retrieval_heads.png"]
    assert store.read_file(refs["eval.needle"], "plots/needle_heatmaps.png")[:4] == b"\x89PNG"
    pref = store.read_table(refs["eval.preference"]).to_pylist()
    assert {r["metric"] for r in pref} >= {"context_conditioned", "joint_reversal",
                                           "no_context_unconditional"}


def test_retrieval_curriculum_documents_are_answerable_from_context(pretrained):
    """Recall documents answer with the passkey planted earlier; repeated lists repeat exactly; blocks are
    packed with EOS between documents and the same seed gives the same blocks."""
    import random
    import re

    from tracecore.tasks.eval_longctx import curriculum_blocks, recall_document, repeated_list_document
    from tracecore.tasks.models import model_dir
    from transformers import AutoTokenizer

    rng = random.Random(0)
    for _ in range(50):
        doc = recall_document(rng)
        planted = dict(re.findall(r"The secret passkey of (\w+) is (\d{5})\. ", doc + " "))
        answered = re.findall(r"Answer: The secret passkey of (\w+) is (\d{5})\.", doc)
        assert answered and all(planted[key] == secret for key, secret in answered), doc
        first, again = repeated_list_document(rng).removeprefix("List: ").split(". Again: ")
        assert first + "." == again
    cfg, refs = pretrained
    store = ArtifactStore(cfg.store)
    with model_dir(store, refs["pretrain.model"]) as folder:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    blocks = curriculum_blocks(tok, random.Random(1), 16, 64, 0.5)
    assert blocks.shape == (16, 64) and (blocks == tok.eos_token_id).sum() >= 2
    assert (blocks == curriculum_blocks(tok, random.Random(1), 16, 64, 0.5)).all()


def test_verdict_intervals_stay_inside_each_metrics_range():
    """Perplexity and losses are positive (interval on the log scale), accuracies lie in [0, 1] and chrF in
    [0, 100]: three noisy seeds must not give a negative perplexity or an accuracy above 1."""
    noisy = {"perplexity": [1.1, 1.2, 60.0], "qa_accuracy": [0.0, 0.0, 0.9], "mc_accuracy": [0.1, 0.95, 1.0],
             "translation_chrf": [1.0, 2.0, 90.0], "instruction_loss": [0.1, 0.1, 9.0],
             "instruction_accuracy": [0.0, 0.5, 1.0]}
    rows = [{"subset": "random", "seed": k, **{m: v[k] for m, v in noisy.items()}} for k in range(3)]
    bounds = {"perplexity": (0, math.inf), "instruction_loss": (0, math.inf), "translation_chrf": (0, 100),
              "qa_accuracy": (0, 1), "mc_accuracy": (0, 1), "instruction_accuracy": (0, 1)}
    for r in verdict(rows, 0.95):
        low, high = bounds[r["metric"]]
        assert low <= r["lo"] <= r["hi"] <= high, r
        assert r["lo"] < r["hi"], r  # still an interval, not a collapsed point


def test_needle_heatmaps_carry_a_colour_bar_the_values_and_integer_ticks():
    """A reader must see each cell's accuracy without guessing colours, and lengths as the integers they
    are."""
    from tracecore.tasks.eval_longctx import heatmaps_figure

    rows = [{"method": m, "length": n, "depth": d, "accuracy": a}
            for m in ("full", "razor") for n in (256, 1024) for d, a in ((0.0, 0.25), (0.5, 1.0), (1.0, 0.0))]
    fig = heatmaps_figure(rows)
    panels = [ax for ax in fig.axes if ax.get_title() in ("full", "razor")]
    assert len(panels) == 2 and len(fig.axes) == 3  # one colour bar for both panels
    texts = [t.get_text() for ax in panels for t in ax.texts]
    assert sorted(texts) == sorted(["0.25", "1.00", "0.00"] * 4)
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["256", "1024"]


def test_multiple_choice_is_scored_by_mean_token_logprob_not_the_length_biased_sum():
    """Summed log-prob favours the shortest choice (fewer negative terms): the verdict's MC accuracy was below
    chance for every checkpoint. lm-eval's acc_norm normalises by length; we normalise by tokens."""
    from tracecore.tasks.eval_quality import mc_pick

    short_wrong, long_right = (-6.0, False, 2), (-9.0, False, 6)  # (summed log-prob, greedy hit, tokens)
    assert mc_pick([short_wrong, long_right]) == 1
    assert mc_pick([(-1.0, True, 1), (-9.0, False, 3)]) == 0


def test_verdict_shows_the_chance_line_and_flags_accuracy_below_it():
    rows = [{"subset": s, "seed": k, "mc_chance": 0.25,
             **dict.fromkeys(["perplexity", "qa_accuracy", "translation_chrf", "instruction_loss",
                              "instruction_accuracy"], 1.0 + k), "mc_accuracy": 0.15 + 0.01 * k}
            for s in ("tagcos", "random") for k in (0, 1, 2)]
    mc = {r["subset"]: r for r in verdict(rows, 0.95) if r["metric"] == "mc_accuracy"}
    assert mc["tagcos"]["chance"] == 0.25 and "below chance" in mc["tagcos"]["note"]
    assert "below chance" in mc["tagcos-random"]["note"]
    other = [r for r in verdict(rows, 0.95) if r["metric"] == "qa_accuracy"]
    assert all(r["note"] == "" for r in other)
