"""What the pipeline costs beyond the stages' own work, and the demo run's peak memory.

    .venv/bin/python bench/pipeline_overhead.py [--keep DIR] [-S section.key=value ...]

Two fresh copies of the repository (git-tracked files, the demo data), the same params:

- bare: one process calls the stage functions of ``rlhf_tasks.stages.STAGES`` in order
  (base_model, validate, sft, reward, policy, evaluate; not promote, which is registry work),
  no Prefect, no MLflow; the sum of the calls' wall times;
- pipeline: `rlhf run` as `make demo` runs it (Prefect flow on a temporary API, every stage an
  MLflow run, models logged, promote registers), timed from outside, its process tree's memory
  sampled every 0.1 s.

Prints the overhead (pipeline wall time against the sum of the bare stages; the issue's goal: at
most 10%), the time from command start to the first training stage (the sft run opened in MLflow)
and to its first logged training step, and the peak resident memory of the `rlhf run` process
and of its whole process tree (goal: at most 3 GiB). Figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from demo_copy import BIN, demo_copy

BARE = """
import json, sys, time
from rlhf_tasks.config import load_params
from rlhf_tasks.stages import STAGES
params = load_params("params.yaml", sys.argv[1:])
times = {}
for name, fn in STAGES.items():
    if name == "promote":
        continue
    start = time.perf_counter()
    fn(params)
    times[name] = time.perf_counter() - start
print(json.dumps(times))
"""

FIRST_STEP = """
import json, mlflow
from rlhf_tasks.tracking import store
mlflow.set_tracking_uri(store.tracking_uri())
client = mlflow.MlflowClient()
run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`rlhf.stage` = 'sft'",
                         output_format="list")[0]
history = [client.get_metric_history(run.info.run_id, key) for key in run.data.metrics]
stamps = [m.timestamp for metric in history for m in metric if m.step > 0]
print(json.dumps({"sft_start_ms": run.info.start_time, "first_step_ms": min(stamps, default=None)}))
"""


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(the process's RSS, the RSS of it and all its descendants), bytes."""
    try:
        own = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = own
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return own, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in DIR and keep it (default: a temp dir)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    base_env.pop("MLFLOW_TRACKING_URI", None)
    base_env.pop("PREFECT_API_URL", None)
    overrides = [a for o in args.overrides for a in ("-S", o)]

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        bare_dir, run_dir = root / "bare", root / "pipeline"
        env_bare, env_run = dict(base_env), dict(base_env)
        demo_copy(bare_dir, env_bare)
        demo_copy(run_dir, env_run)

        print("bare stage functions ...", flush=True)
        proc = subprocess.run(
            [sys.executable, "-c", BARE, *args.overrides],
            cwd=bare_dir,
            env=env_bare,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(f"bare stages failed:\n{proc.stderr[-3000:]}")
        bare = json.loads(proc.stdout.strip().splitlines()[-1])

        print("rlhf run ...", flush=True)
        start_wall = time.time()
        start = time.perf_counter()
        child = subprocess.Popen(
            [BIN / "rlhf", "run", *overrides],
            cwd=run_dir,
            env=env_run,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        watched = psutil.Process(child.pid)
        peak_own = peak_tree = 0
        while child.poll() is None:
            own, tree = _tree_rss(watched)
            peak_own, peak_tree = max(peak_own, own), max(peak_tree, tree)
            time.sleep(0.1)
        wall = time.perf_counter() - start
        if child.returncode:
            sys.exit(f"rlhf run exited {child.returncode}:\n{child.stderr.read()[-3000:]}")
        proc = subprocess.run(
            [sys.executable, "-c", FIRST_STEP],
            cwd=run_dir,
            env=env_run,
            capture_output=True,
            text=True,
        )
        first = json.loads(proc.stdout.strip().splitlines()[-1]) if not proc.returncode else {}

    total_bare = sum(bare.values())
    gib = 1024**3
    print(f"\n{os.cpu_count()} CPUs")
    print("bare stage functions (s): " + ", ".join(f"{k} {v:.1f}" for k, v in bare.items()))
    print(f"  sum of the bare stages:              {total_bare:7.1f} s")
    print(f"  rlhf run (flow, tracking, registry): {wall:7.1f} s")
    print(f"  overhead:                            {100 * (wall - total_bare) / total_bare:7.1f} %")
    for key, label in (("sft_start_ms", "sft stage starts"), ("first_step_ms", "first sft step")):
        if first.get(key):
            print(f"  command start -> {label + ':':20s}{first[key] / 1000 - start_wall:7.1f} s")
    print(f"  peak RSS, rlhf run process:          {peak_own / gib:7.2f} GiB")
    print(f"  peak RSS, its process tree:          {peak_tree / gib:7.2f} GiB")


if __name__ == "__main__":
    main()
