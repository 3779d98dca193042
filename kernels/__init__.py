"""tracecore kernels: Mini-Sequence Transformer pieces, each Triton kernel beside its PyTorch reference.

`apply_mini_sequence(model)` wraps a Hugging Face Llama-family causal LM; `reference` holds the
PyTorch implementations (CPU path and test oracle); `triton_ce` the Triton kernel (imported on use,
so CPU-only installs never need a GPU toolchain).
"""

from tracecore.kernels.mini_sequence import apply_mini_sequence, default_chunks
from tracecore.kernels.reference import lm_head_ce, mini_sequence_mlp, plain_lm_head_ce

__all__ = ["apply_mini_sequence", "default_chunks", "lm_head_ce", "mini_sequence_mlp", "plain_lm_head_ce"]
