"""Intervals and tests for proportions, shared by every stage that reports a rate (one definition, so every
table's interval has the same edge rules); fingerprinted like any code a stage calls."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k of n: stays inside [0, 1], unlike a normal interval at 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # rounding never excludes p


def below_rate_p(k: int, n: int, rate: float) -> float:
    """One-sided exact binomial p-value that k of n is below `rate` (e.g. a selection's flag rate vs. the
    pool's): a lower count alone is not evidence when the expected count is a handful."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, min(max(rate, 0.0), 1.0), alternative="less").pvalue) if n else 1.0
