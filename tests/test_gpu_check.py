"""`bench/gpu_check.sh --smoke`: the GPU proof script runs end to end at toy sizes on a CPU, so it cannot rot
before a GPU machine runs it for real (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
# ~1.5 min on 2 cores of a slow machine, ~3 min on one; the script's own limits are 11 min
@pytest.mark.timeout(900)
def test_gpu_check_smoke_writes_every_table(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=840, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + (tmp_path / "log.txt").read_text()[-3000:]
    assert "torch" in (tmp_path / "environment.txt").read_text()
    tables = {name: (tmp_path / f"{name}.md").read_text()
              for name in ("mini_sequence", "gradients", "long_context", "long_context_batch")}
    assert "LM head + cross-entropy" in tables["mini_sequence"]
    assert "Longest trainable" in tables["mini_sequence"]
    assert "failed/OOM" not in tables["mini_sequence"]
    assert "batch-size-1 loop" in tables["gradients"] and "records/s" in tables["gradients"]
    for method in ("full", "razor", "longcache"):
        assert f"| {method}" in tables["long_context"]
    assert "|     2 | razor" in tables["long_context_batch"]
    assert "every step finished" in (tmp_path / "log.txt").read_text()
