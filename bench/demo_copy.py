"""What the demo benchmarks share: a fresh copy of the project with the demo data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def demo_copy(work: Path, env: dict[str, str]) -> None:
    """Copy the repository's git-tracked files into ``work`` (a fresh clone, as `make demo`
    starts from) and generate the demo data there; ``env`` gets PYTHONPATH=work, so that the
    copy's code runs."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in (f for f in files if f and (ROOT / f).is_file()):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes((ROOT / rel).read_bytes())
    env["PYTHONPATH"] = str(work)
    subprocess.run([BIN / "rlhf", "data", "demo"], cwd=work, env=env, check=True)
