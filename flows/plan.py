"""Deterministic planning: which artifact each stage will produce, computed before any work.

Refs are fingerprints of (stage config, upstream refs + external inputs, code), so the whole plan is
known up front: `tracecore status` shows what a run will skip, `--stages tokenize` finds its inputs from
earlier runs, and the pipeline can start every stage as soon as its upstream stages have committed.
Refs are stage-namespaced (`tokenize.tokens`): two stages may both call an output `rejects`.
"""

from __future__ import annotations

from typing import Any

from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.registry import needed_stages, stages_of
from tracecore.tasks.runtime.stage import StagePlan, plan_stage


def qualified(stage: str, refs: dict[str, str]) -> dict[str, str]:
    return {f"{stage}.{name}": ref for name, ref in refs.items()}


def plan_pipeline(cfg: Any, store: ArtifactStore, selected: list[str] | None = None) -> dict[str, StagePlan]:
    """stage -> its plan, for the selected stages and every upstream stage they read from (in order)."""
    stages, refs, plans = stages_of(cfg), {}, {}
    for name in needed_stages(cfg, selected):
        plans[name] = plan_stage(stages[name], cfg, refs, store)
        refs |= qualified(name, plans[name].refs)
    return plans


def pipeline_refs(plans: dict[str, StagePlan]) -> dict[str, str]:
    """Every planned ref, stage-namespaced (`eval.verdict`)."""
    return {key: ref for name, plan in plans.items() for key, ref in qualified(name, plan.refs).items()}
