"""The stage contract (#17): one namespace when installed, lineage == fingerprint inputs, code versions that
follow helpers, a user's stage registered from a profile, independent stages running concurrently."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO
from tracecore.flows.plan import plan_pipeline
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.registry import STAGES, dependencies, registry, stages_of
from tracecore.tasks.runtime.stage import fingerprint_of


@pytest.mark.slow
def test_the_installed_wheel_exposes_one_tracecore_namespace(tmp_path):
    """`pip install .` must not put generic `tasks`/`configs`/... modules into site-packages."""
    source = tmp_path / "src"  # a copy: building in place would leave build/ in the working tree
    for folder in ("flows", "tasks", "kernels", "storage", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, source / file)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], check=False, capture_output=True,
                            text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("tracecore-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tracecore"}
    assert "tracecore/configs/tiny.yaml" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                                str(site),
                                str(wheel)], check=False, capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    probe = ("import tracecore.tasks.runtime.registry as r, tracecore.flows.cli, tracecore.kernels;"
             "print(r.__file__); print(len(r.STAGES)); print(r.load_config('tiny').profile)")
    out = subprocess.run([sys.executable, "-c", probe], check=False, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    path, n_stages, profile = out.stdout.split()
    assert path.startswith(str(site)) and int(n_stages) == len(STAGES) and profile == "tiny"


def test_every_artifact_manifest_reproduces_its_fingerprint(pipeline_run):
    """Lineage == fingerprint inputs, for every artifact of every stage (and the finetune sub-artifacts)."""
    cfg, store = pipeline_run.cfg, pipeline_run.store
    # a GGUF import (model_import/<sha>) is keyed by its file, not by a stage plan (tests/test_gguf.py)
    artifacts = [a for a in store.list_artifacts() if store.is_committed(a)
                 and not a.startswith("model_import/")]
    stages = {store.manifest(a)["stage"] for a in artifacts}
    assert stages == set(STAGES)
    for ref in artifacts:
        assert fingerprint_of(store.manifest(ref)) == ref.split("/")[1], ref
    plans = plan_pipeline(cfg, store)
    for name, plan in plans.items():  # and the planner's lineage is what was committed
        for out, planned in plan.outputs.items():
            if store.is_committed(planned.ref):
                assert store.manifest(planned.ref)["inputs"] == planned.lineage["inputs"], (name, out)


def test_user_inputs_are_in_the_lineage(test_config, tmp_path):
    """The drifts the issue measured: a user tokenizer, a user model, preference's library."""
    from tokenizers import Tokenizer, models

    folder = tmp_path / "tok"
    folder.mkdir()  # a tokenizer the plan's check accepts: its eos_token is in its vocabulary
    Tokenizer(models.WordLevel({"</s>": 0, "a": 1}, unk_token="</s>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    model = tmp_path / "model"
    model.mkdir()
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"")
    cfg = test_config(f"tokenize.tokenizer_path={folder}", f"pretrain.model_path={model}")
    plans = plan_pipeline(cfg, ArtifactStore(cfg.store))
    assert "user_tokenizer" in plans["tokenize"].inputs
    assert {"model_path", "model_files", "tokenizer"} == set(plans["pretrain"].inputs)
    assert {"library", "model", "sample"} <= set(plans["preference"].inputs)
    assert {"trained_len", "eval_fraction", "finetune", "preference", "sample",
            "tokens"} <= set(plans["eval"].inputs)


def test_editing_a_helper_changes_the_fingerprint_of_the_stages_that_use_it(test_config, monkeypatch):
    import tracecore.tasks.runtime.stage as stage_mod

    cfg = test_config()
    store = ArtifactStore(cfg.store)
    assert "tracecore.tasks.instructions" in stages_of(cfg)["finetune"].code_modules()
    # via tracecore.kernels
    assert "tracecore.kernels.mini_sequence" in stages_of(cfg)["finetune"].code_modules()
    before = {name: plan.primary.ref for name, plan in plan_pipeline(cfg, store).items()}
    real = stage_mod.module_source
    monkeypatch.setattr(stage_mod, "module_source",
                        lambda name: real(name)
                            + ("\n# edited" if name == "tracecore.tasks.instructions" else ""))
    after = {name: plan.primary.ref for name, plan in plan_pipeline(cfg, store).items()}
    changed = {name for name in before if before[name] != after[name]}
    # the stages that import the helper, and everything downstream of them (their inputs changed)
    assert changed == {"gradients", "select", "finetune", "eval"}


def test_a_stage_that_needs_an_unknown_output_fails_naming_it(test_config, tmp_path, monkeypatch):
    from tracecore.configs.schema import ConfigError

    (tmp_path / "bad_stage.py").write_text(TOY_SOURCE.replace('"tokenize.tokens"', '"tokenize.tokenz"')
                                           .replace('"toy"', '"bad"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = test_config("extra_stages=[bad_stage]")
    with pytest.raises(ConfigError, match=r"stage bad: needs 'tokenize.tokenz'"):
        dependencies(cfg)


TOY_PAGE = REPO / "docs" / "development" / "writing-a-stage.md"
TOY_SOURCE = re.search(r"<!-- toy-stage begin -->\n```python\n(.*?)```", TOY_PAGE.read_text(),
                       re.DOTALL).group(1)


def test_a_toy_stage_registers_and_runs_in_the_pipeline(prefect_harness, test_config, tmp_path, monkeypatch):
    """The docs' example stage (Writing a stage): one module + the profile's `extra_stages`, run by the
    pipeline flow."""
    from tracecore.flows.pipeline import pipeline

    (tmp_path / "toy_stage.py").write_text(TOY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = test_config("extra_stages=[toy_stage]", "toy.min_tokens=5", "stages=[toy]")
    assert "toy" in registry(("toy_stage",)) and "toy" not in STAGES  # registered for this config only
    result = pipeline(config=cfg.model_dump(mode="json"), run_id="toy")
    store = ArtifactStore(cfg.store)
    ref = result["refs"]["toy.lengths"]
    manifest = store.manifest(ref)
    assert manifest["inputs"] == {"tokens": result["refs"]["tokenize.tokens"]}
    lengths = store.read_table(ref).column("n_tokens").to_pylist()
    assert lengths and min(lengths) >= 5 and manifest["tokens"] == sum(lengths)
    record = json.loads(store.fs.open(f"{store.run_dir('toy')}/run.json").read())
    assert set(record["stages"]) == {"sample", "ingest", "tokenize", "toy"}
    assert record["stages"]["toy"]["status"] == "computed"
    from tracecore.flows.pipeline import (
        stage_flow,  # an extra stage has its own flow too (old code: built-ins only)
    )

    assert stage_flow("toy")(config=cfg.model_dump(mode="json"))["toy.lengths"] == ref


def test_independent_stages_overlap_in_time(pipeline_run):
    """ngram and pretrain both read only tokenize's outputs: one starts before the other ends."""
    record = pipeline_run.record
    ngram, pretrain = record["stages"]["ngram"], record["stages"]["pretrain"]
    assert ngram["started_s"] < pretrain["finished_s"] and pretrain["started_s"] < ngram["finished_s"]
    tokenize = record["stages"]["tokenize"]
    assert min(ngram["started_s"], pretrain["started_s"]) >= tokenize["finished_s"]  # but after their input


def test_stages_overlap_only_where_they_cannot_share_torch_state(test_config):
    """In-process Dask threads share torch's global RNG and thread count: one stage at a time there."""
    assert test_config().max_parallel_stages() == 1  # the test profile: dask.processes false
    assert test_config("dask.processes=true").max_parallel_stages() is None
    assert test_config("parallel_stages=3").max_parallel_stages() == 3


def test_no_sample_world_unless_a_stage_reads_it(test_config, tmp_path):
    """A user's corpus, tasks, pool and preference file: the stages that take them plan no sample world;
    eval (whose items and haystacks are the sample world's) is the one stage that always reads it."""
    import json as _json

    corpus, qa, pool, prefs = (tmp_path / n
                               for n in ("corpus.jsonl", "qa.jsonl", "pool.jsonl", "prefs.jsonl"))
    corpus.write_text(_json.dumps({"id": "a", "text": "some text"}) + "\n")
    qa.write_text(_json.dumps({"question": "q?", "answer": "a"}) + "\n")
    pool.write_text(_json.dumps({"instruction": "i", "input": "", "output": "o"}) + "\n")
    prefs.write_text(_json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    cfg = test_config(f"ingest.paths=[{corpus}]", f"memorization.tasks=[{{name: qa, kind: qa, path: {qa}}}]",
                      f"gradients.pool_path={pool}",
                      f"preference.inputs=[{{path: {prefs}, format: pairwise}}]")
    store = ArtifactStore(cfg.store)
    user_stages = ["ingest", "tokenize", "pretrain", "ngram", "trace", "memorization", "gradients", "select",
                   "preference"]
    assert "sample" not in plan_pipeline(cfg, store, user_stages)
    assert "sample" in plan_pipeline(cfg, store, ["eval"])
    assert "sample" in plan_pipeline(test_config(), store, ["trace"])  # the sample world's task files
