"""Model helpers every model-using stage shares: where a model artifact's folder is, which device runs it.

Its own module so stages do not import each other for them (no cycle, one `resolve_device`)."""

from __future__ import annotations

import contextlib

from tracecore.storage.store import ArtifactStore


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
    """Context manager yielding a local HF folder for a model artifact (trained here or registered by path)."""
    external = store.manifest(model_ref).get("external_path")
    return contextlib.nullcontext(external) if external else store.local_dir(model_ref)
