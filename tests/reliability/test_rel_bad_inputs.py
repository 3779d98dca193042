"""The bad-input catalogue's cases beyond ingest/preference/tasks (those live beside their stages; the
full table is tests/reliability/README.md): instructions, configs, paths, models, coresets."""

from __future__ import annotations

import json

import pytest
from tracecore.configs.schema import ConfigError
from tracecore.tasks.instructions import load_pool
from tracecore.tasks.runtime.registry import load_config

BAD_INSTRUCTIONS = [  # (line, reason fragment)
    ('{"instruction": "x", "output": ', "bad JSON"),
    ('["instruction", "output"]', "missing or empty 'instruction'"),
    ('{"input": "x", "output": "y"}', "missing or empty 'instruction'"),
    ('{"instruction": "  ", "output": "y"}', "missing or empty 'instruction'"),
    ('{"instruction": "x", "output": 7}', "'input'/'output' must be strings"),
    ('{"instruction": "x", "input": ["a"], "output": "y"}', "'input'/'output' must be strings"),
]


def test_malformed_instructions_become_rejects_with_line_and_reason(tmp_path):
    good = [json.dumps({"id": f"g{i}", "instruction": "Say hi.", "output": "hi"})
            for i in range(len(BAD_INSTRUCTIONS))]
    lines = [x for pair in zip(good, (b for b, _ in BAD_INSTRUCTIONS)) for x in pair]
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, rejects = load_pool(str(path))
    assert [r["id"] for r in records] == [f"g{i}" for i in range(len(BAD_INSTRUCTIONS))]  # no good row lost
    assert [r["line"] for r in rejects] == [2 * i + 2 for i in range(len(BAD_INSTRUCTIONS))]
    for (_, reason), rej in zip(BAD_INSTRUCTIONS, rejects):
        assert reason in rej["reason"] and rej["file"] == str(path)


BAD_CONFIGS = [  # (--set overrides, message fragment naming the field)
    (["finetune.epochs=0"], "finetune.epochs"),
    (["finetune.subsets=[tagcos, best]"], "finetune.subsets.1"),
    (["eval.needle_depths=[]"], "eval.needle_depths"),
    (["pretrain.device=tpu"], "pretrain.device: must be one of"),
    (["finetune.learning_rate=0.1"], "finetune.learning_rate: unknown key"),
    (["gradients.checkpoint_steps=[30, 10]"], "checkpoint_steps must be increasing"),
    (["pretrain.hidden_size=100", "pretrain.heads=3"], "hidden_size must be divisible by heads"),
    (["finetune"], "--set expects key=value"),
]


@pytest.mark.parametrize("overrides,fragment", BAD_CONFIGS)
def test_bad_config_fails_before_work_naming_the_field(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("tiny", overrides)
    assert fragment in str(info.value)


def test_bad_profile_path_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="profile 'nope' not found"):
        load_config("nope")
    broken = tmp_path / "broken.yaml"
    broken.write_text("finetune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))


def test_model_paths_that_are_not_safe_hf_folders_are_refused(tmp_path):
    """Refused when the run is planned, before any stage runs."""
    from conftest import TEST_PROFILE, stage_plan
    from tracecore.tasks.pretrain import ModelPathError
    from tracecore.tasks.runtime.registry import load_config

    cfg = load_config(str(TEST_PROFILE), [f"pretrain.model_path={tmp_path}"], store=str(tmp_path / "store"))
    with pytest.raises(ModelPathError, match="config.json missing"):
        stage_plan(cfg, "pretrain")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelPathError, match="pickled .bin weights are refused"):
        stage_plan(cfg, "pretrain")


def test_missing_corpus_glob_names_the_pattern(tmp_path):
    from tracecore.tasks.ingest import NoInputError, list_input_files

    with pytest.raises(NoInputError, match="nothing/here"):
        list_input_files([str(tmp_path / "nothing/here/*.jsonl")])


def test_coreset_ids_missing_from_the_pool_are_an_error(tmp_path):
    import pyarrow as pa
    from tracecore.storage.store import ArtifactStore
    from tracecore.tasks.finetune import subset_records

    store = ArtifactStore(tmp_path / "store")
    store.write_shard("coreset/x", 0, pa.table({"record_id": ["a", "zzz"]}))
    store.commit("coreset/x", {}, expected_shards=1)
    with pytest.raises(ValueError, match="1 ids of coreset/x are not in the pool"):
        subset_records(store, [{"id": "a"}, {"id": "b"}], "coreset/x")
