"""`make test-latest`: a throw-away venv resolved from pyproject.toml alone runs the fast suite.

The lock keeps every machine on the same releases; this check resolves the newest releases within
pyproject's ranges instead, so a release that breaks tracecore is seen before a user's fresh resolve sees it.
On failure it downgrades each release newer than the lock, one at a time, and names the first whose
downgrade makes the failing tests pass.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST_SUITE = ["tests/test_install.py", "tests/test_configs.py", "tests/test_store.py",
              "tests/test_kernels.py", "tests/test_stage_contract.py", "tests/test_ingest.py"]
MAX_SUSPECTS = 12


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, check=False, **kwargs)


def locked_versions() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", (REPO / "requirements.lock").read_text(),
                      flags=re.MULTILINE)
    return {canonical(n): v for n, v in pins}


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    return {canonical(n): v for n, v in (line.split("==", 1) for line in out.splitlines() if "==" in line)}


def build_venv(venv: Path) -> Path:
    """A fresh venv: torch's CPU build first (a bare resolve would take a CUDA build), then the project's
    ranges."""
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)]).check_returncode()
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"]).check_returncode()
    run([str(python), "-m", "pip", "install", "-q", "--upgrade-strategy", "eager", "-e",
         ".[dev]"]).check_returncode()
    run([str(python), "-m", "pip", "check"]).check_returncode()
    return python


def fast_suite(python: Path, *extra: str) -> bool:
    return run([str(python), "-m", "pytest", "-q", "-m", "not slow and not gpu", *extra,
                *FAST_SUITE]).returncode == 0


def first_culprit(python: Path, newer: dict[str, tuple[str, str]]) -> str | None:
    """Downgrade one newer release at a time to its locked version; the first that fixes the failures is
    it."""
    for name, (latest, locked) in list(newer.items())[:MAX_SUSPECTS]:
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"{name}=={locked}"]).check_returncode()
        fixed = fast_suite(python, "--lf", "-x")
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"{name}=={latest}"]).check_returncode()
        if fixed:
            return f"{name}=={latest} (lock: {locked})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=REPO / ".venv-latest", help="throw-away venv (rebuilt)")
    args = parser.parse_args()
    python = build_venv(args.venv)
    locked, latest = locked_versions(), installed_versions(python)
    newer = {n: (v, locked[n]) for n, v in sorted(latest.items()) if n in locked and locked[n] != v}
    print("releases newer than the lock:", ", ".join(f"{n} {b} -> {a}" for n, (a, b) in newer.items())
          or "none")
    if fast_suite(python):
        print("test-latest: the fast suite passes on the newest releases within pyproject's ranges")
        return 0
    culprit = first_culprit(python, newer) if newer else None
    print(f"test-latest: incompatible release: {culprit}" if culprit else
          "test-latest: the fast suite fails on the newest releases; no single downgrade to the lock fixes "
          "it "
          f"(newer than the lock: {', '.join(newer) or 'none'})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
