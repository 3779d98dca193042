"""Fingerprints and lineage records: what makes an artifact folder name reproducible."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import inspect
import sys

TRACKED_PACKAGES = ("tracecore", "prefect", "dask", "distributed", "pyarrow", "torch", "transformers",
                    "tokenizers", "peft", "infini-gram", "pydantic")


def code_version(*module_names: str) -> str:
    """Hash of the stage modules' source: editing a stage (or a helper it lists) invalidates its artifacts."""
    digest = hashlib.sha256()
    for name in module_names:
        digest.update(inspect.getsource(importlib.import_module(name)).encode())
    return digest.hexdigest()[:12]


def fingerprint(stage: str, config_hash: str, inputs: dict[str, str], code: str) -> str:
    """Fingerprint = stage + stage config hash + input artifact fingerprints + code version."""
    parts = [stage, config_hash, code] + [f"{k}={v}" for k, v in sorted(inputs.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def lineage(stage: str, config_hash: str, inputs: dict[str, str], code: str, **extra) -> dict:
    """The record every committed artifact carries in its `_MANIFEST.json`."""
    return {"stage": stage, "config_hash": config_hash, "inputs": dict(sorted(inputs.items())),
            "code_version": code, "packages": package_versions(), **extra}
