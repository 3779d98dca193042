"""tracecore kernels: Mini-Sequence Transformer pieces, each Triton kernel beside its PyTorch reference.

`apply_mini_sequence(model)` wraps any Hugging Face causal LM (MLP chunking for the families in `families`); `reference` holds the
PyTorch implementations (CPU path and test oracle); `triton_ce` the Triton kernel (imported on use,
so CPU-only installs never need a GPU toolchain). Names load lazily, so `tracecore.kernels.settings`
(the cache policies' settings, read by the config) imports without torch.
"""

import importlib

_EXPORTS = {"apply_mini_sequence": "mini_sequence", "default_chunks": "mini_sequence", "lm_head_ce": "reference",
            "mini_sequence_mlp": "reference", "plain_lm_head_ce": "reference"}
__all__ = ["apply_mini_sequence", "default_chunks", "lm_head_ce", "mini_sequence_mlp", "plain_lm_head_ce"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
