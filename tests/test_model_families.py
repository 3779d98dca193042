"""Any Hugging Face causal-LM family: the per-architecture table (`kernels/families.py`) and what it claims.

Each claim is checked on a tiny randomly initialised model of that family built here: LoRA targets exist
and are the attention projections (never the MLP), the functional forward reproduces the HF logits for
every family marked `decoding`, and the others are refused with a reason naming the model type.
"""

from __future__ import annotations

import pytest
import torch
from tracecore.kernels.families import FAMILIES, decoding_obstacle, lora_targets, meta_model, missing_targets
from transformers import AutoConfig, AutoModelForCausalLM

SIZES = {  # each family's config names for a 2-layer, 64-wide model
    "gpt2": {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4},
}
LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, vocab_size=500, **SIZES.get(model_type, LLAMA_LIKE))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_lora_targets_exist_and_are_attention_projections(model_type):
    model = meta_model(tiny_config(model_type))
    targets = lora_targets(model.config, None)
    assert targets and missing_targets(model, targets) == []
    matched = [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    assert matched and all(".mlp." not in n for n in matched)  # GPT-2's mlp.c_proj is not an attention target
    assert len(matched) == 2 * len(targets)  # each target once per layer


@pytest.mark.parametrize("model_type", sorted(k for k, f in FAMILIES.items() if f.decoding))
def test_functional_forward_reproduces_every_decoding_family(model_type):
    from tracecore.kernels.decoding import FullAttention, forward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager").eval()
    x = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    torch.testing.assert_close(forward(model, x, FullAttention(model), 0), ref, rtol=1e-4, atol=1e-5)


def test_families_without_the_functional_forward_are_named():
    assert decoding_obstacle(tiny_config("llama")) is None
    reason = decoding_obstacle(tiny_config("gpt_neox"))
    assert "'gpt_neox'" in reason and "llama" in reason


# ---- user models of other families through the pipeline ------------------------------------------------
def save_user_model(folder, model_type: str, tok) -> None:
    """A tiny randomly initialised model of `model_type` with the given tokenizer, as a user would save it."""
    torch.manual_seed(0)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **SIZES.get(model_type, LLAMA_LIKE),
                                  **special)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def user_model_overrides(folder) -> list[str]:
    """Every model-using stage at its smallest, LoRA on wherever a stage offers it."""
    return [f"pretrain.model_path={folder}", f"tokenize.tokenizer_path={folder}", "memorization.max_items=8",
            "memorization.bootstrap=10", "gradients.checkpoint_steps=[2]", "finetune.subsets=[tagcos]",
            "finetune.epochs=1", "finetune.lora=true", "preference.rm_lora=true", "eval.max_items=3",
            "eval.needle_lengths=[64]", "eval.needle_depths=[0.5]", "eval.retrieval_train_steps=0"]


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama"])
def test_a_user_model_of_each_family_runs_every_stage_that_applies(model_type, pretrained, test_config,
                                                                   tmp_path, caplog):
    import logging

    from tracecore.flows.pipeline import run_stages
    from tracecore.storage.store import ArtifactStore
    from transformers import AutoTokenizer

    cfg0, refs0 = pretrained
    with ArtifactStore(cfg0.store).local_dir(refs0["tokenize.tokenizer"]) as tok_dir:
        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    save_user_model(tmp_path / "user-model", model_type, tok)
    cfg = test_config(*user_model_overrides(tmp_path / "user-model"))
    with caplog.at_level(logging.INFO, logger="tracecore"):
        refs = run_stages(cfg)
    store = ArtifactStore(cfg.store)
    assert all(store.is_committed(ref) for name, ref in refs.items() if name != "eval.needle_model")
    assert store.manifest(refs["pretrain.model"])["model_type"] == model_type
    assert store.read_table(refs["finetune.finetune"]).num_rows == 1
    assert store.read_table(refs["eval.quality"]).num_rows == 2  # the user's model and its fine-tuned copy
    dropped = {r.getMessage() for r in caplog.records if " left out: " in r.getMessage()}
    # every drop is counted, with why
    for score in store.read_table(refs["memorization.scores"]).to_pylist()[:1]:
        lost = score["items_overlap_dropped"] + score["items_unaligned"]
        expected = f"memorization: {lost} of {score['items']} {score['task']} items left out"
        assert not lost or any(m.startswith(expected) for m in dropped), (expected, dropped)
    long_context = store.manifest(refs["eval.long_context"])
    skipped = [r.getMessage() for r in caplog.records if "long context skipped" in r.getMessage()
               or "RAG vs. long context skipped" in r.getMessage()]
    if model_type == "llama":
        assert "skipped" not in long_context and store.read_table(refs["eval.long_context"]).num_rows > 0
        assert not skipped
    else:  # one line naming the model type; the artifacts say why, the rest of the stage ran
        assert len(skipped) == 1 and "'gpt_neox'" in skipped[0]
        assert "'gpt_neox'" in long_context["skipped"]
        assert store.read_table(refs["eval.long_context"]).num_rows == 0


def planning_error(test_config, folder, *overrides):
    from tracecore.configs.schema import ConfigError
    from tracecore.flows.plan import plan_pipeline
    from tracecore.storage.store import ArtifactStore

    cfg = test_config(f"pretrain.model_path={folder}", *overrides)
    with pytest.raises(ConfigError) as info:
        plan_pipeline(cfg, ArtifactStore(cfg.store))
    return str(info.value)


def config_only_folder(folder, model_type: str, **size):
    """config.json + a weights file: all that planning reads (the errors come before any weights load)."""
    folder.mkdir()
    AutoConfig.for_model(model_type, vocab_size=500, **size).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_unsupported_models_are_refused_when_the_run_is_planned(test_config, tmp_path):
    # fused qkv_proj: not in the table
    phi3 = config_only_folder(tmp_path / "phi3", "phi3", pad_token_id=0, **LLAMA_LIKE)
    message = planning_error(test_config, phi3)
    assert "gradients.target_modules" in message and "'phi3'" in message and "qkv_proj" in message
    assert "\n" not in message
    message = planning_error(test_config, phi3, "gradients.target_modules=[qkv_proj,o_proj]",
                             "finetune.lora=true", "finetune.target_modules=[q_proj]")
    assert message.startswith("finetune.target_modules: q_proj match no module of model type 'phi3'")
    encoder = config_only_folder(tmp_path / "distilbert", "distilbert", dim=64, n_layers=1, n_heads=2)
    assert "'distilbert', not a causal LM" in planning_error(test_config, encoder)
    llama = config_only_folder(tmp_path / "llama", "llama", **LLAMA_LIKE)
    message = planning_error(test_config, llama, f"memorization.models=[{llama}, {encoder}]")
    assert message.startswith("memorization.models[1]: ") and "not a causal LM" in message
    broken = config_only_folder(tmp_path / "broken", "llama", pad_token_id=9999, **LLAMA_LIKE)
    assert planning_error(test_config,
                          broken).startswith("pretrain.model_path: transformers cannot build model "
                                                          "type 'llama' from its config.json: AssertionError")
