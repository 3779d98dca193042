"""Security properties, checked on the source: no pickle, safe torch.load, no remote code, loopback servers,
paths from configs cannot leave the store."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("flows", "tasks", "kernels", "storage", "configs", "bench")
                 for p in (REPO / d).rglob("*.py"))


def calls(name: str):
    """(file, call node) for every call whose function name ends with `name`."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_no_pickle_anywhere():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                    for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"pickle", "cloudpickle", "dill", "joblib"}, path


def test_torch_load_only_with_weights_only():
    for path, node in calls("load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
            value = keyword(node, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}"


def test_from_pretrained_never_trusts_remote_code():
    found = 0
    for path, node in calls("from_pretrained"):
        value = keyword(node, "trust_remote_code")
        if value is not None:
            found += 1
            assert isinstance(value, ast.Constant) and value.value is False, f"{path}:{node.lineno}"
    assert found >= 5
    for path, node in calls("SentenceTransformer"):
        value = keyword(node, "trust_remote_code")
        assert isinstance(value, ast.Constant) and value.value is False, f"{path}:{node.lineno}"


def test_servers_bind_to_loopback_by_default():
    from tracecore.configs.schema import DaskConfig
    from tracecore.flows.cli import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    runtime = (REPO / "flows" / "runtime.py").read_text()
    assert 'host="127.0.0.1"' in runtime or "127.0.0.1" in runtime
    assert DaskConfig().address is None  # no remote scheduler unless configured


@pytest.mark.parametrize("relpath", ["../escape.txt", "a/../../escape", "/etc/passwd"])
def test_paths_cannot_escape_the_store(tmp_path, relpath):
    from tracecore.storage.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.write_file("x/y", relpath, b"no")
    assert not (tmp_path / "escape.txt").exists()
