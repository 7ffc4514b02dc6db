"""Wall time of `rlhf run` on the demo twice in a row: the second run finds every stage cached.

    .venv/bin/python bench/cached_rerun.py [--keep DIR]

Copies the repository's git-tracked files into a scratch directory (a fresh clone), generates the
demo data, then times `rlhf run` (the Prefect flow on its ephemeral API, MLflow's embedded store)
twice with the same params. The first run trains everything; the second reuses every stage but
`promote` (which always decides against the registry). Prints both times and their ratio (the
issue's goal: the second at most 10% of the first), and the task states of the second run.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp) / "demo"
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\0")
        for rel in (f for f in files if f and (ROOT / f).is_file()):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes((ROOT / rel).read_bytes())
        env["PYTHONPATH"] = str(work)
        subprocess.run([BIN / "rlhf", "data", "demo"], cwd=work, env=env, check=True)

        times, logs = [], []
        for _ in range(2):
            start = time.perf_counter()
            proc = subprocess.run(
                [BIN / "rlhf", "run"], cwd=work, env=env, capture_output=True, text=True
            )
            times.append(time.perf_counter() - start)
            if proc.returncode:
                sys.exit(f"rlhf run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            logs.append(proc.stdout + proc.stderr)
        states = re.findall(r"Task run '(\w+)' - Finished in state (\w+)", logs[1])
        print(f"\n{os.cpu_count()} CPUs")
        print(f"rlhf run, first (trains every stage):  {times[0]:7.1f} s")
        print(f"rlhf run, second (same inputs):        {times[1]:7.1f} s")
        print(f"second / first:                        {100 * times[1] / times[0]:7.1f} %")
        print("second run's task states: " + ", ".join(f"{n} {s}" for n, s in states))


if __name__ == "__main__":
    main()
