"""The stage contract: what a stage declares, and the one runner that executes every stage.

DataTrove's split between a `PipelineStep` and its executor: a stage's `compute` only computes over its
inputs and writes its outputs; the runner owns planning (fingerprints), the lock, verify/repair,
skip-if-committed and lineage. Each output's lineage is the very record its fingerprint was hashed
from (`Planned`), so a manifest always says exactly what its artifact was computed from.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from tracecore.storage.lineage import fingerprint, lineage
from tracecore.storage.store import ArtifactStore
from tracecore.tasks.runtime.common import ShardReport, dask_client, get_logger, map_shards

# The runner's own package: left out of every code version, by package (it holds no domain logic;
# tests/test_architecture.py checks that), so a runner change does not recompute results.
INFRASTRUCTURE_PACKAGE = "tracecore.tasks.runtime"


@dataclass(frozen=True)
class Planned:
    """An artifact ref bound to the lineage record its fingerprint was computed from (they cannot drift)."""

    ref: str
    lineage: dict


def plan_artifact(stage: str, artifact: str, config_hash: str, inputs: Mapping[str, str],
                  code: str) -> Planned:
    """`<artifact>/<fingerprint>` plus the lineage built from the same stage, config, inputs and code."""
    inputs = {k: str(v) for k, v in inputs.items()}
    return Planned(f"{artifact}/{fingerprint(stage, config_hash, inputs, code)}",
                   lineage(stage, config_hash, inputs, code))


def fingerprint_of(manifest: dict) -> str:
    """Recompute an artifact's fingerprint from its manifest's lineage (tests: lineage == fingerprint)."""
    return fingerprint(manifest["stage"], manifest["config_hash"], manifest["inputs"],
                       manifest["code_version"])


# ---- code versions ------------------------------------------------------------------------------------
def module_source(name: str) -> str:
    return inspect.getsource(importlib.import_module(name))


def imported_modules(name: str) -> set[str]:
    """tracecore task/kernel modules `name` imports anywhere in its source (lazy imports included)."""
    return set(_imported_modules(name, module_source(name)))


@functools.lru_cache(maxsize=512)
def _imported_modules(name: str, source: str) -> frozenset[str]:
    """Keyed by the source text, so an edited module is parsed again: parsing is most of planning, and every
    plan of a stage re-plans its upstream."""
    found = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module in ("tracecore.tasks", "tracecore.kernels"):
            names = [_submodule(node.module, a.name) for a in node.names]  # `from tracecore.kernels import x`
        else:
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found |= {n for n in names if n.startswith(("tracecore.tasks.", "tracecore.kernels"))}
    return frozenset(n for n in found if not n.startswith(INFRASTRUCTURE_PACKAGE))


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`: an import made only for a type annotation runs no
    code, so it is no dependency of a result (a library annotating with a stage's config stays that
    library)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _submodule(package: str, name: str) -> str:
    """The module behind `from package import name`: the submodule itself, or the module that defines the
    attribute (a package may re-export lazily, so its own source does not name it)."""
    import importlib.util

    if importlib.util.find_spec(f"{package}.{name}"):
        return f"{package}.{name}"
    defined_in = getattr(getattr(importlib.import_module(package), name, None), "__module__", None) or package
    return defined_in if defined_in.startswith(package) else package


def code_modules(*roots: str) -> list[str]:
    """The roots plus every task/kernel module they import, transitively: editing any helper a stage
    calls changes the stage's code version (a resumed run never reuses results of old code)."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(imported_modules(name) - seen)
    return sorted(seen)


def code_version(modules: list[str]) -> str:
    """Hash of the modules' names and sources (`module_source`, looked up at call time)."""
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + module_source(name).encode())
    return digest.hexdigest()[:12]


# ---- the contract -------------------------------------------------------------------------------------
Needs = Mapping[str, str] | Callable[[Any], Mapping[str, str]]


@dataclass(frozen=True)
class Stage:
    """One stage, declared once in its module (`STAGE = Stage(...)`) and listed in the registry.

    - `needs`: local input name -> upstream output `"stage.output"` (or a function of the pipeline config,
      for inputs that depend on settings, e.g. no sample world when the user gives files).
    - `outputs`: output name -> artifact folder; all share the stage fingerprint; the first is primary and
      is committed last (its manifest means "stage done").
    - `external(pipeline_cfg, upstream, store) -> (inputs, args)`: fingerprinted identities of files the
      stage reads from outside the store, and plain run arguments (paths) that are not fingerprinted.
    - `subartifacts(cfg, inputs, code) -> {name: Planned}`: outputs keyed finer than the stage (finetune's
      models are keyed per variant, so adding a seed reuses the others).
    - `code`: extra modules the results depend on that are not imported by name (rare).
    """

    name: str
    config: type
    outputs: Mapping[str, str]
    compute: Callable[[StageRun], None]
    needs: Needs = field(default_factory=dict)
    external: Callable[[Any, dict[str, str], ArtifactStore], tuple[dict, dict]] | None = None
    subartifacts: Callable[[Any, dict[str, str], str], dict[str, Planned]] | None = None
    config_hash: Callable[[Any], str] = lambda cfg: cfg.fingerprint()
    code: tuple[str, ...] = ()
    description: str = ""

    def upstream(self, pipeline_cfg: Any) -> dict[str, str]:
        return dict(self.needs(pipeline_cfg) if callable(self.needs) else self.needs)

    def code_modules(self) -> list[str]:
        return code_modules(self.compute.__module__, *self.code)


@dataclass(frozen=True)
class StagePlan:
    """Everything the runner needs, computed before any work: refs with their lineage, plain args."""

    stage: str
    outputs: dict[str, Planned]
    args: dict[str, Any]

    @property
    def refs(self) -> dict[str, str]:
        return {name: p.ref for name, p in self.outputs.items()}

    @property
    def primary(self) -> Planned:
        return next(iter(self.outputs.values()))

    @property
    def inputs(self) -> dict[str, str]:
        return self.primary.lineage["inputs"]

    def to_json(self) -> dict:
        return {"stage": self.stage, "args": self.args,
                "outputs": {n: {"ref": p.ref, "lineage": p.lineage} for n, p in self.outputs.items()}}

    @classmethod
    def from_json(cls, data: dict) -> StagePlan:
        return cls(data["stage"], {n: Planned(o["ref"], o["lineage"]) for n, o in data["outputs"].items()},
                   data["args"])


def plan_stage(stage: Stage, pipeline_cfg: Any, refs: Mapping[str, str], store: ArtifactStore) -> StagePlan:
    """Refs of every output: fingerprint of (stage, its config, upstream refs + external inputs, code)."""
    cfg = getattr(pipeline_cfg, stage.name)
    upstream = {local: refs[qualified] for local, qualified in stage.upstream(pipeline_cfg).items()}
    external, args = stage.external(pipeline_cfg, upstream, store) if stage.external else ({}, {})
    inputs, code = {**upstream, **external}, code_version(stage.code_modules())
    config_hash = stage.config_hash(cfg)
    outputs = {name: plan_artifact(stage.name, folder, config_hash, inputs, code)
               for name, folder in stage.outputs.items()}
    extra = stage.subartifacts(cfg, inputs, code) if stage.subartifacts else {}
    return StagePlan(stage.name, {**outputs, **extra}, args)


@dataclass
class StageRun:
    """What the runner hands `compute`: the stage's config, its inputs and planned outputs, the cluster."""

    store: ArtifactStore
    cfg: Any
    plan: StagePlan
    # the stage's own Dask client (`run_stage` opens one per stage run), or None: in-process
    cluster: Any = None

    @property
    def inputs(self) -> dict[str, str]:
        return self.plan.inputs

    @property
    def address(self) -> Any:
        """`cluster` under its earlier name, for stages written against it (`map_shards` takes either)."""
        return self.cluster

    @property
    def args(self) -> dict[str, Any]:
        return self.plan.args

    @property
    def log(self):
        return get_logger()

    def ref(self, name: str) -> str:
        return self.plan.outputs[name].ref

    def lineage(self, name: str) -> dict:
        return self.plan.outputs[name].lineage

    def commit(self, name: str, stats: dict | None = None, expected_shards: int | None = None,
               table: pa.Table | None = None) -> dict:
        """Commit an output with the lineage it was planned from, plus the stage's stats; an output that names
        `report_columns` keeps its first rows in the manifest, so reports never read its data (`table`: the
        output's one table, when the caller holds it, so they are not read back)."""
        stats = dict(stats or {})
        if "report_columns" in stats:
            rows = table.slice(0, PREVIEW_ROWS).to_pylist() if table is not None else self.first_rows(name)
            stats["report_rows"] = preview_rows(rows, stats["report_columns"])
        return self.store.commit(self.ref(name), {**self.lineage(name), **stats}, expected_shards)

    def first_rows(self, name: str, limit: int = 0) -> list[dict]:
        """The first `limit` (default `PREVIEW_ROWS`) rows of an output's written shards, in shard order."""
        limit, rows = limit or PREVIEW_ROWS, []
        for marker in sorted(self.store.markers(self.ref(name)), key=lambda m: m["shard"]):
            rows += self.store.read_shard(self.ref(name), marker["shard"]).to_pylist()
            if len(rows) >= limit:
                break
        return rows[:limit]

    def map(self, name: str, fn: Callable[..., dict], items: list[Any], **kwargs: Any) -> ShardReport:
        """`fn(store_uri, ref, shard, item, **kwargs)` over `items` into output `name`, one shard per item, on
        the stage's cluster, skipping finished shards (`map_shards`, named after the stage and output)."""
        return map_shards(self.step(name), self.store, self.ref(name), fn, items, self.cluster, **kwargs)

    def step(self, name: str) -> str:
        """The label of the pass that writes output `name` (logs, progress, fault specs such as
        `ngram-index:1`):
        the stage's name for its primary output, else `<stage>-<output>`."""
        primary = next(iter(self.plan.outputs))
        return self.plan.stage if name == primary else f"{self.plan.stage}-{name.replace('_', '-')}"

    def write(self, name: str, table: pa.Table, stats: dict | None = None) -> dict:
        """A single-table output: written as its one shard and committed with `stats`."""
        self.store.write_shard(self.ref(name), 0, table)
        return self.commit(name, stats, expected_shards=1, table=table)


# rows of a report table kept in its manifest: the report shows 50, a Prefect table artifact 200
PREVIEW_ROWS = 200


def preview_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    """A report table's rows in its columns, JSON-safe (a manifest is JSON), at most `PREVIEW_ROWS`."""
    def plain(value: Any) -> Any:
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return [{c: plain(r.get(c)) for c in columns} for r in rows[:PREVIEW_ROWS]]


def already_committed(store: ArtifactStore, stage: str, ref: str) -> bool:
    """True, and logged, when a stage's primary artifact is in the store and intact: the stage is skipped.
    A committed artifact whose parts no longer match their records is repaired (un-committed, corrupt shards
    dropped, paths logged) and the stage recomputes what is missing: corrupt data is never used."""
    status = store.status(ref)
    if status.corrupt:
        store.repair(ref, status)
        get_logger().warning("%s: %s has corrupt parts, recomputing: %s", stage, ref,
                             ", ".join(status.corrupt))
        return False
    if status.committed:
        get_logger().info("%s: %s already committed, skipping", stage, ref)
        return True
    return False


def run_stage(stage: Stage, cfg: Any, plan: StagePlan, store_uri: str, address: str | None = None,
              reusable: bool = False) -> dict[str, str]:
    """skip if committed and intact -> lock -> verify/repair -> compute -> check the primary was committed.
    `reusable`: the caller's answer from `store.status` was "committed and intact", so the stage is skipped
    without asking again (committed artifacts never change). A stage that computes gets one Dask client for
    all its passes (one per pass cost ~17 ms each)."""
    store = ArtifactStore(store_uri)
    primary = plan.primary.ref
    if reusable:
        get_logger().info("%s: %s already committed, skipping", stage.name, primary)
        return plan.refs
    with store.lock(primary):  # the answer is asked again under the lock: another run may have committed it
        if not already_committed(store, stage.name, primary):
            with dask_client(address) as client:
                stage.compute(StageRun(store, cfg, plan, client))
            if not store.is_committed(primary):
                raise RuntimeError(f"stage {stage.name}: compute returned without committing {primary}")
    return plan.refs
