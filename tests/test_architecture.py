"""Module boundaries are cache keys (a stage's code version is the tracecore code it reaches), so they are
checked like behaviour: AST only, no stage runs.

- no stage module reaches another stage's module (stages never import each other; shared code lives in
  library modules, fingerprinted like any code a stage calls);
- the infrastructure package (`tracecore.tasks.runtime`: runner, shard mapping, logging, fault injection) is
  the only code left out of code versions, by package, and defines bookkeeping only;
- editing a library helper changes the code version of exactly the stages that reach it.
"""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest
from tracecore.tasks.runtime.registry import BUILTIN, registry
from tracecore.tasks.runtime.stage import INFRASTRUCTURE_PACKAGE, code_modules, code_version

# What the infrastructure package may define: bookkeeping a stage calls, never a computation's logic.
BOOKKEEPING = {
    "common": {"MODEL_LOAD_LOCK", "FAULT_ENV", "RAISE_ENV", "DELAY_ENV", "InjectedFailure", "ShardReport",
               "in_prefect_run", "get_logger", "log_dropped", "Progress", "inject_fault", "run_shard",
               "dask_client",
               "worker_threads", "host_threads", "usable_markers", "map_shards", "set_torch_threads"},
}


def stage_modules() -> dict[str, str]:
    return {stage.name: stage.compute.__module__ for stage in registry().values()}


def reached(module: str) -> set[str]:
    """Every tracecore task/kernel module `module` reaches, infrastructure included."""
    from tracecore.tasks.runtime import stage as stage_mod

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(stage_mod._imported_modules(name, stage_mod.module_source(name)) - seen)
    return seen


def test_no_stage_module_reaches_another_stage_module():
    modules = stage_modules()
    crossings = {name: sorted(set(code_modules(module)) & (set(modules.values()) - {module}))
                 for name, module in modules.items()}
    assert not {k: v for k, v in crossings.items() if v}, crossings


def test_only_the_infrastructure_package_is_left_out_of_a_code_version():
    """Exclusion is by package: a domain helper moved into the runner's modules would silently leave every
    stage's fingerprint (failed on the old code: `tasks/common.py`'s `normalize_text` was excluded)."""
    for name, module in stage_modules().items():
        left_out = reached(module) - set(code_modules(module))
        assert all(m.startswith(INFRASTRUCTURE_PACKAGE + ".") for m in left_out), (name, sorted(left_out))


def test_the_infrastructure_package_defines_bookkeeping_only():
    package = importlib.import_module(INFRASTRUCTURE_PACKAGE)
    for short in sorted(BOOKKEEPING):
        module = importlib.import_module(f"{package.__name__}.{short}")
        tree = ast.parse(inspect.getsource(module))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        extra = {d for d in defined if not d.startswith("_")} - BOOKKEEPING[short]
        assert not extra, (f"{module.__name__} defines {sorted(extra)}: domain code belongs in a library "
                           "module")


def test_every_stage_module_is_registered():
    assert set(stage_modules().values()) == set(BUILTIN)


def test_each_stage_config_is_defined_beside_its_stage():
    """The module that computes is the module that says what can be set (failed on the old code: every
    config class lived in configs/schema.py)."""
    for name, stage in registry().items():
        assert stage.config.__module__ == stage.compute.__module__, (name, stage.config.__module__)


def test_a_type_only_import_is_no_dependency():
    """A library annotating with a stage's config (under `if TYPE_CHECKING:`) does not pull that stage into
    the code version of another stage that uses the library."""
    from tracecore.tasks.runtime.stage import _imported_modules

    source = ("from typing import TYPE_CHECKING\nimport tracecore.tasks.text\n"
              "if TYPE_CHECKING:\n    from tracecore.tasks.eval import EvalConfig\n")
    assert _imported_modules("probe", source) == {"tracecore.tasks.text"}
    assert "tracecore.tasks.pretrain" not in code_modules("tracecore.tasks.eval")


@pytest.mark.parametrize("helper, reaching, not_reaching", [
    ("tracecore.tasks.text", {"eval", "preference", "sample"}, set()),
    ("tracecore.tasks.memorization_scores", {"memorization"}, {"trace", "ngram"}),
])
def test_editing_a_library_helper_changes_exactly_the_stages_that_reach_it(monkeypatch, helper, reaching,
                                                                           not_reaching):
    """Simulated edit: the source a code version hashes is changed for one module (failed on the old code:
    editing `normalize_text` changed no fingerprint, editing memorization's statistics changed trace's)."""
    from tracecore.tasks.runtime import stage as stage_mod

    stages = registry()
    before = {name: code_version(stages[name].code_modules()) for name in reaching | not_reaching}
    original = stage_mod.module_source
    monkeypatch.setattr(stage_mod, "module_source",
                        lambda name: original(name) + ("\n# edited" if name == helper else ""))
    after = {name: code_version(stages[name].code_modules()) for name in before}
    assert {n for n in before if before[n] != after[n]} == reaching


def test_resume_finds_a_run_in_the_store_its_profile_names(tmp_path, monkeypatch):
    """`tracecore run --resume RUN_ID --profile P` looks in P's store, and a run of a built-in profile is
    found
    without --profile (failed on the old code: it opened `--store` or `.tracecore/store` only)."""
    from tracecore.configs.schema import ConfigError
    from tracecore.flows.cli import resume_store
    from tracecore.storage.runs import start_run, write_run
    from tracecore.storage.store import ArtifactStore

    monkeypatch.chdir(tmp_path)  # the default store (.tracecore/store) is empty here
    other = tmp_path / "elsewhere" / "store"
    profile = tmp_path / "mine.yaml"
    profile.write_text(f"extends: tiny\nstore: {other}\n")
    write_run(ArtifactStore(other),
              start_run(ArtifactStore(other), "20261207-000000-abcdef", {"store": str(other)}))
    assert resume_store("20261207-000000-abcdef", str(profile), None).uri.endswith("elsewhere/store")
    with pytest.raises(ConfigError, match="^--resume 20261207-000000-abcdef: no such run"):
        resume_store("20261207-000000-abcdef", "tiny", None)



def test_one_word_tokeniser_and_windower():
    """Word-level rules share `tasks/text.py`: no other module compiles its own word pattern (there were
    three, with different edge rules: preference split on whitespace, so "Hello," and "hello" were different
    words)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    own = [str(p.relative_to(root)) for folder in ("tasks", "kernels", "flows")
           for p in (root / folder).rglob("*.py")
           if p.name != "text.py" and re.search(r"re\.(compile|findall|finditer)\(r\"\\\\w\+", p.read_text())]
    assert own == []
    from tracecore.tasks.preference import shingles
    from tracecore.tasks.trace import item_ngrams

    # failed on the old code
    assert shingles("Hello, world!  How are you?") == shingles("hello world how are you")
    assert shingles("") == set() and shingles("Hi there") == {"hi there"}  # shorter than k: one shingle
    item = {"input": "Where was Anan born?", "output": "Mivel"}
    assert item_ngrams(item, 13, 1) == ["where was anan born mivel"]  # the same short-sequence rule
