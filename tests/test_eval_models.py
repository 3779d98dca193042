"""Long-context evaluation on extra pretrained models: the grid's rows, the random-heads control, the KV
bytes measured from the caches, the summary's intervals and Razor's checks."""

from __future__ import annotations

from tracecore.configs.schema import EvalConfig, LongContextModel
from tracecore.storage.store import ArtifactStore


def test_a_tiny_gguf_model_runs_the_grid_with_every_method(tmp_path):
    """The path a real model takes (GGUF import, head probe, needles, RAG), on a random tiny Llama: what must
    hold whatever it retrieves is checked (methods, KV shares measured from the caches, the control's
    size)."""
    from test_gguf import write_tiny_llama
    from tracecore.tasks.eval_models import evaluate_model, summarize_models

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    spec = LongContextModel(name="tiny", path=str(path), lengths=[200], depths=[0.5], rag_top_k=[1],
                            rag_chunk_tokens=32,
                            razor={"min_buffer": 8, "compression": 8.0, "probe_block": 16})
    cfg = EvalConfig(long_context_models=[spec])
    store = ArtifactStore(tmp_path / "store")
    evaluate_model(store.uri, "needles/x", 0, {"name": "tiny", "heads_ref": "heads/x"}, cfg=cfg)
    rows = store.read_shard("needles/x", 0).to_pylist()
    heads = store.read_shard("heads/x", 0).to_pylist()
    assert {r["method"] for r in rows} == {"full", "razor", "razor_random_heads", "rag_top1"}
    assert sum(h["retrieval"] for h in heads) == sum(h["random"] for h in heads) >= 1
    summary = {r["method"]: r for r in summarize_models(rows)}
    assert summary["full"]["kv_vs_full"] == 1.0 and summary["razor"]["kv_vs_full"] < 0.6
    assert summary["rag_top1"]["tokens_in_context"] < summary["full"]["tokens_in_context"]
    for plot in ("needle_tiny", "needle_heatmaps_tiny"):
        assert store.read_file("needles/x", f"plots/{plot}.png").startswith(b"\x89PNG")


def test_summary_intervals_and_razor_checks_follow_the_hits():
    from tracecore.tasks.eval_models import razor_checks, summarize_models

    def rows(method, hits, kv):
        return [{"model": "m", "method": method, "length": 1024, "depth": 0.5, "hit": h, "kv_bytes": kv,
                 "tokens": 1000}
                for h in hits]
    summary = summarize_models(rows("full", [True] * 4, 100) + rows("razor", [True, True, True, False], 25)
                               + rows("razor_random_heads", [False] * 4, 25))
    by = {r["method"]: r for r in summary}
    assert by["razor"]["accuracy"] == 0.75 and by["razor"]["needles"] == 4
    assert by["razor"]["kv_vs_full"] == 0.25
    assert 0 <= by["razor"]["lo"] < 0.75 < by["razor"]["hi"] <= 1 and by["full"]["hi"] == 1.0
    (check,) = razor_checks(summary)
    assert check["razor_minus_full"] == -0.25 and check["probe_minus_random_heads"] == 0.75
    assert not check["note"]
    (same,) = razor_checks(summarize_models(rows("full", [True] * 2, 100) + rows("razor", [True] * 2, 25)
                                            + rows("razor_random_heads", [True] * 2, 25)))
    assert same["note"] == "random heads of the same count did as well as the probe's"


def test_prompts_use_the_chat_template_where_the_model_has_one(smollm2_folder):
    from tracecore.tasks.eval_models import prompt_ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_folder[0], local_files_only=True)
    text = tok.decode(prompt_ids(tok, "Some text.", "Kelo"))
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text
    assert text.rstrip().endswith("The secret passkey of Kelo is")
