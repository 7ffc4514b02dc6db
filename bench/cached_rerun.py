"""Wall time of `rlhf run` on the demo twice in a row: the second run finds every stage cached.

    .venv/bin/python bench/cached_rerun.py [--keep DIR] [--api ephemeral|server|both]

Copies the repository's git-tracked files into a scratch directory (a fresh clone), generates the
demo data, then times `rlhf run` (MLflow's embedded store) twice with the same params. The first
run trains everything; the second reuses every stage but `promote` (which always decides against
the registry). Prints both times and their ratio (the issue's goal: the second at most 10% of the
first), and the task states of the second run.

`--api ephemeral` runs the flow on Prefect's ephemeral API, as `make demo` does: each `rlhf run`
starts a temporary Prefect server (seconds of fixed cost). `--api server` first starts a real
`prefect server start` on 127.0.0.1 (its own PREFECT_HOME, stopped at the end) and points both
runs at it, as a team deployment runs. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_copy import demo_copy

BIN = Path(sys.executable).parent


def _prefect_server(env: dict[str, str], home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**env, "PREFECT_HOME": str(home)}
    proc = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    sys.exit("prefect server did not start")


def _twice(work: Path, env: dict[str, str]) -> tuple[list[float], list[tuple[str, str]]]:
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
    return times, re.findall(r"Task run '(\w+)' - Finished in state (\w+)", logs[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in DIR and keep it (default: a temp dir)")
    parser.add_argument("--api", choices=["ephemeral", "server", "both"], default="both")
    args = parser.parse_args()
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    base_env.pop("MLFLOW_TRACKING_URI", None)
    base_env.pop("PREFECT_API_URL", None)
    modes = ["ephemeral", "server"] if args.api == "both" else [args.api]

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{os.cpu_count()} CPUs")
        for mode in modes:
            work = (args.keep or Path(tmp)) / f"demo-{mode}"
            env = dict(base_env)
            demo_copy(work, env)
            server = None
            if mode == "server":
                server, url = _prefect_server(env, Path(tmp) / "prefect-home")
                env["PREFECT_API_URL"] = url
            try:
                times, states = _twice(work, env)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(timeout=60)
            print(f"\nPrefect API: {mode}")
            print(f"  rlhf run, first (trains every stage):  {times[0]:7.1f} s")
            print(f"  rlhf run, second (same inputs):        {times[1]:7.1f} s")
            print(f"  second / first:                        {100 * times[1] / times[0]:7.1f} %")
            print("  second run's task states: " + ", ".join(f"{n} {s}" for n, s in states))


if __name__ == "__main__":
    main()
