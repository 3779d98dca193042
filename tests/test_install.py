"""Install guards: nothing in the checkout shadows an installed distribution, and the venv is the committed
lock.

A fresh clone once failed at collection because the repository's `kernels/` folder shadowed Hugging Face's
`kernels` package (imported by transformers) whenever the working directory was on `sys.path`.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
EXTRA_MODULES = ["transformers.activations", "transformers.integrations.hub_kernels"]


def _lock_tools():
    """`.ci/test_latest.py`, the one place that reads requirements.lock (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tracecore_test_latest", REPO / ".ci" / "test_latest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK_TOOLS = _lock_tools()
canonical, locked_versions = LOCK_TOOLS.canonical, LOCK_TOOLS.locked_versions


def project_requirements() -> list[Requirement]:
    """pyproject's runtime and `dev` requirements: what `make setup` must provide."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def import_names(dist: str) -> list[str]:
    """Top-level import names a distribution installs (from its RECORD), skipping private and test modules."""
    names = {name for name, dists in md.packages_distributions().items()
             if canonical(dist) in {canonical(d) for d in dists}}
    return sorted(n for n in names if n.isidentifier() and not n.startswith("_")
                  and n not in {"tests", "test"})


def import_from_repo_root(modules: list[str]) -> dict:
    """Import each module with the repository root first on sys.path (as `python -c` and `python -m` do)."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n"
            "    try:\n        mod = importlib.import_module(m)\n"
            "        out[m] = getattr(mod, '__file__', None) or str(list(getattr(mod, '__path__', [])))\n"
            "    except Exception as e:\n        out[m] = 'ERROR ' + type(e).__name__ + ': ' + str(e)[:300]\n"
            "print(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_repo_top_level_folders_are_not_regular_packages():
    """A folder with `__init__.py` at the root would win over an installed package of the same name."""
    offenders = sorted(p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert not offenders, f"top-level folders with __init__.py shadow installed packages: {offenders}"


def test_every_dependency_imports_from_the_repo_root():
    modules = sorted({n for r in project_requirements() for n in import_names(r.name)} | set(EXTRA_MODULES))
    assert "kernels" in modules or "transformers" in modules
    results = import_from_repo_root(modules)
    errors = {m: f for m, f in results.items() if f.startswith("ERROR")}
    shadowed = {m: f for m, f in results.items() if not f.startswith("ERROR") and str(REPO) in f
                and ".venv" not in f}
    assert not errors, f"imports fail from the repository root: {errors}"
    assert not shadowed, f"repository files shadow installed modules: {shadowed}"


def test_no_repo_name_shadows_any_installed_module():
    """Every installed top-level module whose name is also a root entry resolves to the installed one."""
    installed = set(md.packages_distributions())
    clashes = sorted(p.stem for p in REPO.iterdir() if p.stem in installed and not p.name.startswith("."))
    if not clashes:
        pytest.skip("no root entry shares a name with an installed module")
    results = import_from_repo_root(clashes)
    bad = {m: f for m, f in results.items() if str(REPO) in f and ".venv" not in f}
    assert not bad, f"repository entries shadow installed modules: {bad}"


def test_lock_covers_pyproject_within_its_ranges():
    locked = locked_versions()
    for req in project_requirements():
        name = canonical(req.name)
        assert name in locked, f"requirements.lock: no pin for {req.name} (run `make lock`)"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock: {name}=={locked[name]} is outside pyproject's {req.specifier} "
            "(run `make lock`)")
    torch = locked["torch"]
    assert torch.startswith("2.13.0") and torch.endswith("+cpu"), "torch must stay 2.13.0 CPU"


def test_lock_pins_every_entry_with_a_hash():
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text())
    unhashed = [e.split()[0] for e in entries if "==" in e.split("\n")[0] and "--hash=sha256:" not in e]
    assert not unhashed, f"requirements.lock entries without hashes: {unhashed}"


@pytest.mark.skipif(not (REPO / ".venv").samefile(Path(sys.prefix)) if (REPO / ".venv").exists() else True,
                    reason="runs only inside the project's .venv (what `make setup` built)")
def test_venv_is_exactly_the_lock():
    locked = locked_versions()
    installed = {canonical(d.metadata["Name"]): d.version for d in md.distributions()}
    installed.pop("tracecore", None)
    drift = {n: (v, locked.get(n)) for n, v in installed.items() if locked.get(n) != v and n not in {"pip"}}
    assert not drift, f"installed (version, locked) differ from requirements.lock: {drift}"
