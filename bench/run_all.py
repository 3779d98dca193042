"""`make bench`: every benchmark at a size that finishes in ~10 minutes on 2 cores, and a generated
section of bench/RESULTS.md (date, machine, each script's command and table) that replaces the previous
generated section; the hand-written sections with their readings stay as they are.

    .venv/bin/python bench/run_all.py [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
MARK = "<!-- make bench: generated below this line; everything above is kept -->"
QUICK = {  # script -> arguments for the ~10-minute umbrella run
    "ingest_tokenize.py": ["--repeats", "1"],
    "ngram.py": ["--queries", "1000"],
    "gradients.py": ["--records", "128"],
    "select_coreset.py": [],
    "mini_sequence.py": ["--quick", "--repeats", "1"],
    "razor_settings.py": ["--lengths", "1024", "--needles", "1", "--probe-blocks", "64", "--fractions",
                          "0.14", "--s0", "64"],
    "razor_oracle.py": ["--lengths", "1024", "--needles", "1", "--calibration-lengths", "1024",
                        "--calibration-needles", "1", "--fractions", "0.18"],
    "long_context.py": ["--lengths", "1024", "2048", "4096"],
    "scale.py": ["--sizes", "1e6", "1e7", "--big-file-gb", "0.05"],  # the full 10^8 + 2 GB run: ~36 min
    "orchestration.py": ["--profile", "tests/profile_test.yaml"],
    "near_dedup.py": ["--sizes", "1e6"],  # the full run: --sizes 1e6 1e7 1e8
    "index_queries.py": ["--tokens", "1e6", "--queries", "200", "--cli-calls", "5",
                         "--generations", "20"],  # the tiny profile itself takes ~11 min
}


def machine() -> str:
    """The host, and its calibration measured now (same-size machines differ ~2x; compare within one run)."""
    import torch

    sys.path.insert(0, str(BENCH.parent))
    from tracecore.flows.calibrate import calibration_line

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, torch "
            f"{torch.__version__}; "
            f"{calibration_line()}")


def run(script: str, args: list[str]) -> tuple[str, float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          check=False)
    output = proc.stdout if proc.returncode == 0 else proc.stdout + "\n" + proc.stderr[-2000:]
    return output.strip(), time.perf_counter() - start, proc.returncode


def generated_section(rows: list[tuple[str, list[str], str, float, int]], date: str, host: str) -> str:
    """Markdown for (script, args, output, seconds, exit code) rows, starting with the marker line."""
    parts = [MARK, "", f"## Latest `make bench` ({date}, {host})", ""]
    for script, script_args, output, seconds, code in rows:
        status = "" if code == 0 else f" — FAILED (exit {code})"
        parts += [f"### `python bench/{script} {' '.join(script_args)}` ({seconds:.0f} s){status}", "", "```",
                  output, "```", ""]
    return "\n".join(parts)


def update_results(path: Path, section: str) -> None:
    """Keep everything above the marker (hand-written tables and readings); replace what follows it."""
    kept = path.read_text().split(MARK)[0].rstrip() if path.exists() else "# Benchmark results"
    path.write_text(kept + "\n\n" + section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    missing = sorted(p.name for p in BENCH.glob("*.py") if p.name not in QUICK and p.name != "run_all.py")
    if missing:
        print(f"bench scripts without a quick setting: {missing}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(f"python bench/{s} {' '.join(a)}" for s, a in QUICK.items()))
        return 0
    rows = []
    for script, script_args in QUICK.items():
        print(f"bench/{script} {' '.join(script_args)} ...", flush=True)
        rows.append((script, script_args, *run(script, script_args)))
    update_results(RESULTS, generated_section(rows, datetime.date.today().isoformat(), machine()))
    failed = sum(code != 0 for *_, code in rows)
    print(f"wrote {RESULTS} ({failed} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
