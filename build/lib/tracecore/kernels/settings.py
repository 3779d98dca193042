"""Settings of the long-context cache policies: the one type the kernels take and the eval config holds.

Plain dataclasses (no torch, no pydantic) so `bench/gpu_check.sh` runs the kernels without the pipeline's
dependencies and the config module imports without torch; pydantic validates them as `eval.razor` /
`eval.longcache` and `__post_init__` checks the ranges. Defaults are the papers' / official values; the
eval config scales them for small models.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


def _check(obj, positive: tuple[str, ...], fractions: tuple[str, ...] = ()) -> None:
    for name in positive:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{name} must be > 0 (got {getattr(obj, name)})")
    for name in fractions:
        if not 0 < getattr(obj, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1] (got {getattr(obj, name)})")


@dataclass(frozen=True)
class RazorConfig:
    """RazorAttention (arXiv 2407.15891); official probe: 2500 random tokens repeated 4 times."""

    induction_fraction: float = 0.14
    echo_fraction: float = 0.01
    sinks: int = 4  # N0
    min_buffer: int = 4096  # S0
    compression: float = 5.0  # C: recent buffer = max(S0, N / C)
    compensation: bool = True
    probe_block: int = 2500
    probe_repeats: int = 4

    def __post_init__(self) -> None:
        _check(self, ("min_buffer", "compression", "probe_block"), ("induction_fraction", "echo_fraction"))
        if self.sinks < 0 or self.probe_repeats < 2:
            raise ValueError("sinks must be >= 0 and probe_repeats >= 2")


@dataclass(frozen=True)
class LongCacheConfig:
    """LongCache/ReAttention (arXiv 2407.15176): official 32 / 4096 / 1 / 32, clip 64, chunk 512."""

    global_size: int = 32
    local_size: int = 4096
    mid_size: int = 1
    span_size: int = 32
    recall_clip: int = -1
    chunk_size: int = 512

    def __post_init__(self) -> None:
        _check(self, ("local_size", "mid_size", "span_size", "chunk_size"))

    def scope(self, chunk: int = 0) -> int:
        """Most tokens one attention call can see (bounded iff recall_clip > 0)."""
        if self.recall_clip <= 0:
            raise ValueError("LongCache scope is unbounded without recall_clip > 0")
        return self.global_size + self.recall_clip * self.span_size + self.local_size + chunk


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]
