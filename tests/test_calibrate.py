"""The calibration line `make test` prints first: fixed work, positive rates, the same fields every time."""

from __future__ import annotations

import re

from tracecore.flows.calibrate import calibrate, calibration_line


def test_calibration_measures_fixed_work_in_seconds():
    import time

    start = time.perf_counter()
    c = calibrate()
    assert time.perf_counter() - start < 30  # a few seconds on any machine (2x margin on a slow one)
    assert c["matmul_gflops"] > 0 and c["matmul_gflops_1thread"] > 0 and c["tokenizer_tokens_per_s"] > 1000
    assert c["cores"] >= 1 and c["load_1min"] >= 0
    line = calibration_line(c)
    assert re.fullmatch(r"calibration: fp32 matmul \d+ GFLOP/s \(\d+ threads; \d+ on 1\), BPE \d+ k "
                        r"tokens/s, "
                        r"\d+ cores, load \d+\.\d before", line), line
