"""Profiles: read a YAML profile (with `extends:`), apply `--set a.b=c` overrides, and turn pydantic's errors
into one readable message that names the field and what it accepts. Validation against the pipeline config
(whose stage sections come from the registry) is `tracecore.tasks.runtime.registry.load_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from tracecore.configs.schema import PROFILE_DIR, ConfigError


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"must be one of {e['ctx']['expected']}"
        lines.append(f"  {field}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists: 4096, true, null, [a, b], 'text'."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def resolve_profile(profile: str) -> Path:
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        path = candidate
    else:
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"profile {profile!r} not found: use one of {known} or a path to a YAML file")
    return path


def _merge(base: dict, over: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def _extended(data: dict, path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """`extends: <profile>`: that profile's sections, with this file's values merged over them."""
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base_path = resolve_profile(str(parent))
    if base_path.resolve() in seen + (path.resolve(),):
        raise ConfigError(f"{path}: `extends: {parent}` is circular")
    base = yaml.safe_load(base_path.read_text()) or {}
    return _merge(_extended(base, base_path, seen + (path.resolve(),)), data)


def read_profile(profile: str = "tiny", overrides: list[str] | None = None, **top: Any) -> tuple[dict, str]:
    """Profile YAML (with `extends:`) + `--set` overrides + explicit top-level values (None = keep);
    returns the raw mapping and its source, for `tracecore.tasks.runtime.registry.load_config` to validate."""
    path = resolve_profile(profile)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = _extended(data, path)
    data.setdefault("profile", path.stem)
    data = apply_overrides(data, list(overrides or []))
    data.update({k: v for k, v in top.items() if v is not None})
    return data, str(path)
