"""Configs: every profile validates; bad values fail before any work, naming the field."""

from __future__ import annotations

import pytest
from tracecore.configs.schema import ConfigError
from tracecore.tasks.runtime.registry import PipelineConfig, load_config, validate_config


@pytest.mark.parametrize("profile", ["tiny", "gpu", "tiny-retrieval"])
def test_shipped_profiles_validate(profile):
    cfg = load_config(profile)
    assert isinstance(cfg, PipelineConfig) and cfg.profile == profile


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"tokenize\.vocab_size: .*integer"):
        load_config("tiny", ["tokenize.vocab_size=lots"])


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"pretrain\.hiden_size: unknown key"):
        load_config("tiny", ["pretrain.hiden_size=64"])


def test_out_of_range_names_the_field_and_bound():
    with pytest.raises(ConfigError,
                       match=r"tokenize\.vocab_size: Input should be less than or equal to 65535"):
        load_config("tiny", ["tokenize.vocab_size=70000"])


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"pretrain\.device: must be one of 'auto', 'cpu' or 'cuda'"):
        load_config("tiny", ["pretrain.device=tpu"])
    with pytest.raises(ConfigError, match=r"stages\.0: must be one of"):
        validate_config({"stages": ["bogus"]})


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="divisible"):
        load_config("tiny", ["pretrain.hidden_size=100", "pretrain.heads=3"])


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["ingest.paths=[a.jsonl, b/*.parquet]", "dask.processes=false",
                               "tokenize.tokenizer_path=null", "pretrain.lr=0.01"])
    assert cfg.ingest.paths == ["a.jsonl", "b/*.parquet"] and cfg.dask.processes is False
    assert cfg.pretrain.lr == 0.01 and cfg.tokenize.tokenizer_path is None


def test_bad_override_syntax_and_profile():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["tokenize.vocab_size"])
    with pytest.raises(ConfigError, match=r"profile 'nope' not found: use one of \['gpu', 'smollm2-long', "
                       r"'tiny', 'tiny-retrieval'\]"):
        load_config("nope")


def test_fingerprint_tracks_settings():
    a, b = load_config("tiny"), load_config("tiny", ["tokenize.vocab_size=5000"])
    assert a.tokenize.fingerprint() != b.tokenize.fingerprint()
    assert a.ingest.fingerprint() == b.ingest.fingerprint()


def test_extends_merges_sections_over_the_base_profile(tmp_path):
    cfg, tiny = load_config("tiny-retrieval"), load_config("tiny")
    # merged key by key
    assert cfg.pretrain.schedule == "constant" and cfg.pretrain.seq_len == tiny.pretrain.seq_len
    # pinned: the model its numbers came from
    assert cfg.pretrain.hidden_size == 192 != tiny.pretrain.hidden_size
    assert cfg.sample.repeated_list_documents > 0 and cfg.sample.n_entities == tiny.sample.n_entities
    assert cfg.finetune.seeds == tiny.finetune.seeds and cfg.finetune.max_steps == 120
    assert cfg.profile == "tiny-retrieval"
    loop = tmp_path / "a.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(loop))
