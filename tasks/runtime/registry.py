"""The stage registry: the one list of stages from which stage names, the dependency graph, the
pipeline config's sections and the per-stage Prefect tasks are derived.

Adding a built-in stage = one module in `tasks/` that declares `STAGE = Stage(...)` + one line in
`BUILTIN`. A user's stage lives in their own module and is named in the profile's `extra_stages:`
(module paths); it is registered for that run only (no global state is mutated).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, ValidationError, create_model
from tracecore.configs.base import ConfigError, PipelineBase
from tracecore.configs.profiles import format_errors, read_profile
from tracecore.tasks.runtime.stage import Stage

BUILTIN = ("tracecore.tasks.sample", "tracecore.tasks.ingest", "tracecore.tasks.tokenize",
           "tracecore.tasks.pretrain", "tracecore.tasks.ngram", "tracecore.tasks.trace",
           "tracecore.tasks.memorization",
           "tracecore.tasks.gradients", "tracecore.tasks.select", "tracecore.tasks.preference",
           "tracecore.tasks.finetune", "tracecore.tasks.eval")


def load_stage(module: str) -> Stage:
    try:
        stage = importlib.import_module(module).STAGE
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"extra_stages: cannot load a stage from module {module!r} ({exc}); the module "
                          f"must "
                          "define STAGE = tracecore.tasks.runtime.stage.Stage(...)") from None
    if not isinstance(stage, Stage):
        raise ConfigError(f"extra_stages: {module}.STAGE is a {type(stage).__name__}, not a Stage")
    return stage


@functools.lru_cache(maxsize=16)
def registry(extra: tuple[str, ...] = ()) -> dict[str, Stage]:
    """name -> Stage, built-ins first, then the extra modules in order (a topological order is checked)."""
    stages: dict[str, Stage] = {}
    for module in BUILTIN + tuple(extra):
        stage = load_stage(module)
        if stage.name in stages:
            raise ConfigError(f"extra_stages: {module} declares stage {stage.name!r}, which already exists")
        stages[stage.name] = stage
    return stages


@functools.lru_cache(maxsize=16)
def pipeline_model(extra: tuple[str, ...] = ()) -> type[PipelineBase]:
    """The PipelineConfig class for a registry: one section per stage, `stages` limited to their names."""
    stages = registry(extra)
    names = tuple(stages)
    sections = {name: (stage.config, Field(default_factory=stage.config, description=stage.description))
                for name, stage in stages.items()}
    return create_model("PipelineConfig", __base__=PipelineBase,
                        stages=(list[Literal[names]], Field(default_factory=lambda: list(names))), **sections)


PipelineConfig = pipeline_model(())  # positional: lru_cache keys f() and f(()) apart
STAGES: tuple[str, ...] = tuple(registry(()))


def validate_config(data: dict, source: str = "config") -> Any:
    """The pipeline config of a mapping, validated once per process per distinct mapping (the flow hands every
    stage task the same dict); each caller gets its own copy, so no caller sees another's edits."""
    return _validated(json.dumps(data, sort_keys=True, default=str), source).model_copy(deep=True)


@functools.lru_cache(maxsize=16)
def _validated(canonical: str, source: str) -> Any:
    data = json.loads(canonical)
    extra = tuple(data.get("extra_stages") or ())
    try:
        return pipeline_model(extra).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


def load_config(profile: str = "tiny", overrides: list[str] | None = None, **top: Any) -> Any:
    """Profile YAML + `--set` overrides + explicit top-level values (None = keep), validated."""
    data, source = read_profile(profile, overrides, **top)
    return validate_config(data, source)


def stages_of(cfg: Any) -> dict[str, Stage]:
    return registry(tuple(cfg.extra_stages))


def dependencies(cfg: Any) -> dict[str, list[str]]:
    """stage -> the stages whose outputs it reads under this config."""
    stages, graph = stages_of(cfg), {}
    for name, stage in stages.items():
        graph[name] = []
        for qualified in stage.upstream(cfg).values():
            upstream, _, output = qualified.partition(".")
            if upstream not in graph or output not in stages[upstream].outputs:
                raise ConfigError(f"stage {name}: needs {qualified!r}, which no earlier stage declares "
                                  f"(stages so far: {list(graph)[:-1]})")
            graph[name] = sorted({*graph[name], upstream})
    return graph


def needed_stages(cfg: Any, selected: Iterable[str] | None = None) -> list[str]:
    """Selected stages plus the upstream ones they read from (reused when committed, else computed)."""
    graph, needed, todo = dependencies(cfg), set(), list(cfg.stages if selected is None else selected)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo += graph[stage]
    return [s for s in stages_of(cfg) if s in needed]
