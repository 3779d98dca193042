"""`make bench` covers every bench script and keeps the hand-written part of bench/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_bench_script_has_a_quick_setting():
    out = subprocess.run([sys.executable, "bench/run_all.py", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[1].split("/")[1] for line in out.stdout.splitlines()}
    assert listed == {p.name for p in (REPO / "bench").glob("*.py")} - {"run_all.py"}


def test_generated_section_replaces_only_itself(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import run_all

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nhand-written reading\n\n" + run_all.MARK + "\nold generated\n")
    rows = [("a.py", ["--quick"], "| x | 1.0 |", 3.2, 0), ("b.py", [], "Traceback", 1.0, 1)]
    run_all.update_results(results, run_all.generated_section(rows, "2026-11-25", "test machine"))
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nhand-written reading") and "old generated" not in text
    assert text.count(run_all.MARK) == 1 and "| x | 1.0 |" in text and "2026-11-25, test machine" in text
    assert "`python bench/b.py ` (1 s) — FAILED (exit 1)" in text
