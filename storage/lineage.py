"""Fingerprints and lineage records: what makes an artifact folder name reproducible."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import sys

TRACKED_PACKAGES = ("tracecore", "prefect", "dask", "distributed", "pyarrow", "torch", "transformers",
                    "tokenizers", "peft", "infini-gram", "pydantic")


def fingerprint(stage: str, config_hash: str, inputs: dict[str, str], code: str) -> str:
    """Fingerprint = stage + stage config hash + input artifact fingerprints + code version."""
    parts = [stage, config_hash, code] + [f"{k}={v}" for k, v in sorted(inputs.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# installed versions do not change inside a process; planning asked 7 times per stage (0.1 s)
@functools.cache
def installed_versions() -> tuple[tuple[str, str], ...]:
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return tuple(versions.items())


def package_versions() -> dict[str, str]:
    return dict(installed_versions())


def lineage(stage: str, config_hash: str, inputs: dict[str, str], code: str, **extra) -> dict:
    """The record every committed artifact carries in its `_MANIFEST.json`."""
    return {"stage": stage, "config_hash": config_hash, "inputs": dict(sorted(inputs.items())),
            "code_version": code, "packages": package_versions(), **extra}
