"""Model helpers every model-using stage shares: where a model artifact's folder is, which device runs it.

Its own module so stages do not import each other for them (no cycle, one `resolve_device`)."""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

from tracecore.storage.store import ArtifactStore


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line errors (a library's message can run to pages)."""
    return str(exc).splitlines()[0] if str(exc) else ""


def resolve_device(device: str) -> str:
    """`auto` = CUDA when available, else CPU; `cpu`/`cuda` as given."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def device_and_dtype(device: str):
    """(device, dtype) for training: bf16 on CUDA, fp32 on CPU."""
    import torch

    resolved = resolve_device(device)
    return resolved, (torch.bfloat16 if resolved == "cuda" else torch.float32)


def model_dir(store: ArtifactStore, model_ref: str):
    """Context manager yielding a local HF folder for a model artifact (trained here, registered by path, or
    imported from a GGUF file: then the import artifact's folder)."""
    manifest = store.manifest(model_ref)
    if manifest.get("external_path"):
        return contextlib.nullcontext(manifest["external_path"])
    return store.local_dir(manifest.get("imported") or model_ref)


def user_model_config(pipeline_cfg):
    """The user's model config (`pretrain.model_path`), read when the run is planned; None for the bootstrap
    Llama (built by the pretrain stage, always a known family)."""
    path = pipeline_cfg.pretrain.model_path
    return causal_lm_config(path, "pretrain.model_path") if path else None


def causal_lm_config(path: str, field: str, store: ArtifactStore | None = None):
    """The config of a local model folder or GGUF file that must be a causal LM transformers knows (no remote
    code); a GGUF file's header is checked first (architecture, tensor types), unless `store` holds its import
    (checked when it was imported: its folder's config is read instead of the file's metadata)."""
    from tracecore.configs.schema import ConfigError
    from tracecore.tasks.gguf_models import gguf_path, is_gguf

    if is_gguf(path):
        file = gguf_path(path, field)
        imported = imported_folder(store, file) if store is not None else None
        if imported:
            return causal_lm_config(imported, field)
        stat = file.stat()
        try:
            # caller's own
            config = copy.deepcopy(checked_gguf_config(str(file), stat.st_size, stat.st_mtime_ns))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(FIELD, field, 1)) from None
    else:
        config = read_config({"pretrained_model_name_or_path": path}, path, field)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{field}: {path!r} is model type {config.model_type!r}, not a causal LM")
    return config


FIELD = "<field>"  # stands for the setting's name in a cached check's error, filled in by the caller


@functools.lru_cache(maxsize=8)
def checked_gguf_config(file: str, size: int, mtime_ns: int):
    """A GGUF file's header check and config, once per process per file version: parsing its metadata (the
    tokenizer's vocabulary included) takes seconds, and several settings may name the same model."""
    from tracecore.tasks.gguf_models import gguf_header

    gguf_header(Path(file), FIELD)
    location = {"pretrained_model_name_or_path": str(Path(file).parent), "gguf_file": Path(file).name}
    return read_config(location, file, FIELD)


def imported_folder(store: ArtifactStore, file: Path) -> str | None:
    """The local folder of this GGUF file's import (`model_import/<fp>`), when the store holds it
    committed."""
    from tracecore.storage.fs import is_local
    from tracecore.tasks.gguf_models import import_ref

    ref = import_ref(cached_sha256(file))
    return store.files_path(ref) if is_local(store.fs) and store.is_committed(ref) else None


def cached_sha256(path: Path) -> str:
    """A file's sha256, once per process per file version (size, modification time): planning asks per
    setting."""
    stat = path.stat()
    return _sha256_of_version(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    from tracecore.tasks.gguf_models import file_sha256

    return file_sha256(Path(path))


def read_config(location: dict, path: str, field: str):
    """transformers' config of a model location, without remote code; an unreadable one named in one line."""
    from tracecore.configs.schema import ConfigError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**location, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{field}: {path!r} is not a model folder transformers reads without remote code "
                          f"({type(exc).__name__}: {first_line(exc)[:200]})") from None


def model_fingerprint(path: str, field: str) -> dict:
    """A model input's identity, one rule for every stage: a GGUF file (or packaged model) by its sha256, a
    folder by its files' identity; the path itself is part of it (`model_path`)."""
    from tracecore.storage.fs import folder_fingerprint
    from tracecore.tasks.gguf_models import gguf_path, is_gguf

    if is_gguf(path):
        file = gguf_path(path, field)
        return {"model_path": str(file), "model_sha256": cached_sha256(file)}
    return {"model_path": str(Path(path).resolve()), "model_files": folder_fingerprint(path)}


def resolve_lora_targets(config, configured: list[str] | None, field: str, model=None) -> list[str]:
    """The LoRA target modules for this architecture (the config field wins), checked against the model's
    module names, so a wrong name fails here naming the field, not inside peft."""
    from tracecore.configs.schema import ConfigError
    from tracecore.kernels.families import linear_names, lora_targets, meta_model, missing_targets

    model = model if model is not None else buildable(config, meta_model)
    targets = lora_targets(config, configured)
    if targets is None:
        raise ConfigError(f"{field}: no LoRA targets known for model type {config.model_type!r}; set {field} "
                          f"to "
                          f"its attention projections (its linear layers: {', '.join(linear_names(model))})")
    missing = missing_targets(model, targets)
    if missing:
        raise ConfigError(f"{field}: {', '.join(missing)} match no module of model type "
                          f"{config.model_type!r} "
                          f"(its linear layers: {', '.join(linear_names(model))})")
    return targets


def buildable(config, build):
    """`build(config)`, a library error becoming one line that names the model type."""
    from tracecore.configs.schema import ConfigError

    try:
        return build(config)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a config it cannot build
        raise ConfigError(f"pretrain.model_path: transformers cannot build model type {config.model_type!r} "
                          f"from its config.json: {type(exc).__name__}: {first_line(exc)}") from None


def check_user_lora_targets(pipeline_cfg, configured: list[str] | None, field: str) -> None:
    """Planning-time check of a user's model against a stage's LoRA targets (before any work starts)."""
    config = user_model_config(pipeline_cfg)
    if config is not None:
        resolve_lora_targets(config, configured, field)


def lora_kwargs(model, configured: list[str] | None, field: str) -> dict:
    """`target_modules` (and GPT-2's `fan_in_fan_out`) for peft's LoraConfig on this model."""
    from tracecore.kernels.families import family

    known = family(model.config)
    targets = resolve_lora_targets(model.config, configured, field, model)
    return {"target_modules": targets, "fan_in_fan_out": bool(known and known.fan_in_fan_out)}
