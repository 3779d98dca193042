"""Where each stage's config lives: beside its stage (`tasks/<stage>.py`), so the module that computes is the
module that says what can be set. This module keeps the old import paths working (`from
tracecore.configs.schema import EvalConfig`) by looking the name up in its stage's module on first use.

Every config forbids unknown keys, so a typo fails before any work starts; the registry composes them into
`PipelineConfig` (one section per registered stage); `configs/profiles.py` reads YAML profiles and overrides.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tracecore.configs.base import ConfigError, DaskConfig, PipelineBase, Strict  # noqa: F401 (re-exported)

PROFILE_DIR = Path(__file__).parent

# name -> the module that defines it (lazy: importing a stage module pulls in its libraries)
HOMES = {
    "SampleConfig": "sample", "IngestConfig": "ingest", "TokenizeConfig": "tokenize",
    "PretrainConfig": "pretrain",
    "NgramConfig": "ngram", "TaskSpec": "taskfiles", "PROMPTS": "taskfiles",
    "MemorizationConfig": "memorization",
    "GradientsConfig": "gradients", "SelectConfig": "select", "PreferenceInput": "preference",
    "PreferenceConfig": "preference", "TraceConfig": "trace", "LongContextConfig": "finetune",
    "FinetuneConfig": "finetune", "RagSettings": "eval", "LongContextModel": "eval", "EvalConfig": "eval",
    "TrainSchedule": "lm_training", "ModelShape": "lm_training",
}


def __getattr__(name: str):
    if name in HOMES:
        return getattr(importlib.import_module(f"tracecore.tasks.{HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
