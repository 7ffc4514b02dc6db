"""What the pipeline costs beyond the stages' own work, and the demo run's peak memory.

    .venv/bin/python bench/pipeline_overhead.py [--pairs N] [--keep DIR] [-S section.key=value ...]

For each of ``--pairs`` interleaved pairs (default 3: bare, pipeline, bare, pipeline, ...), two
fresh copies of the repository (git-tracked files, the demo data), the same params:

- bare: one process calls the stage functions of ``rlhf_tasks.stages.STAGES`` in order
  (base_model, validate, sft, reward, policy, evaluate; not promote, which is registry work),
  no Prefect, no MLflow; the sum of the calls' wall times;
- pipeline: `rlhf run` as `make demo` runs it (Prefect flow on a temporary API, every stage an
  MLflow run, models logged, promote registers), timed from outside, its process tree's memory
  sampled every 0.1 s.

Prints each pair's figures: the overhead (pipeline wall time against the sum of the bare
stages; the goal: at most 10%), the time from command start to the first training stage (the
sft run opened in MLflow) and to its first logged training step (goal: within 20 s), and the
peak resident memory of the `rlhf run` process and of its whole process tree (goal: at most
3 GiB). It ends with the median and range over the pairs, the last line of the form
``overhead: 9.3% (median; range 4.1-12.0% over 3 pairs)``. (This machine's speed drifts within
minutes: the pair's own ratio is the figure to trust.) Figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from demo_copy import BIN, demo_copy
from summary import median_range

BARE = """
import json, sys, time
from rlhf_tasks.config import load_params
from rlhf_tasks.stages import STAGES
params = load_params("params.yaml", sys.argv[1:])
times = {}
for name, stage in STAGES.items():
    if name == "promote":
        continue
    start = time.perf_counter()
    stage.function()(params, stage.io())
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


def _pair(root: Path, base_env: dict[str, str], args: argparse.Namespace) -> dict:
    """One bare run and one `rlhf run`, in fresh copies under ``root``; their figures."""
    overrides = [a for o in args.overrides for a in ("-S", o)]
    bare_dir, run_dir = root / "bare", root / "pipeline"
    env_bare, env_run = dict(base_env), dict(base_env)
    demo_copy(bare_dir, env_bare)
    demo_copy(run_dir, env_run)

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
    return {
        "bare": bare,
        "bare_s": total_bare,
        "run_s": wall,
        "overhead_pct": 100 * (wall - total_bare) / total_bare,
        **{
            key: first[key] / 1000 - start_wall
            for key in ("sft_start_ms", "first_step_ms")
            if first.get(key)
        },
        "peak_own_gib": peak_own / 1024**3,
        "peak_tree_gib": peak_tree / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs of runs")
    parser.add_argument("--keep", type=Path, help="run in DIR and keep it (default: a temp dir)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    base_env.pop("MLFLOW_TRACKING_URI", None)
    base_env.pop("PREFECT_API_URL", None)

    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for i in range(args.pairs):
            pair = _pair(root / f"pair-{i + 1}", base_env, args)
            pairs.append(pair)
            print(
                f"pair {i + 1}: bare {pair['bare_s']:.1f} s ("
                + ", ".join(f"{k} {v:.1f}" for k, v in pair["bare"].items())
                + f"); rlhf run {pair['run_s']:.1f} s; overhead {pair['overhead_pct']:.1f}%; "
                f"first sft step {pair.get('first_step_ms', float('nan')):.1f} s after start; "
                f"peak RSS {pair['peak_own_gib']:.2f} GiB (tree {pair['peak_tree_gib']:.2f})",
                flush=True,
            )

    print(f"\n{os.cpu_count()} CPUs; median (range) over {len(pairs)} pairs")
    rows = (
        ("sum of the bare stages (s)", "bare_s", "{:.1f}"),
        ("rlhf run (flow, tracking, registry) (s)", "run_s", "{:.1f}"),
        ("command start -> sft stage starts (s)", "sft_start_ms", "{:.1f}"),
        ("command start -> first sft step (s)", "first_step_ms", "{:.1f}"),
        ("peak RSS, rlhf run process (GiB)", "peak_own_gib", "{:.2f}"),
        ("peak RSS, its process tree (GiB)", "peak_tree_gib", "{:.2f}"),
    )
    for label, key, fmt in rows:
        values = [p[key] for p in pairs if key in p]
        if values:
            print(f"  {label:42s}{median_range(values, fmt)}")
    overheads = [p["overhead_pct"] for p in pairs]
    print(
        f"overhead: {statistics.median(overheads):.1f}% (median; range "
        f"{min(overheads):.1f}-{max(overheads):.1f}% over {len(pairs)} pairs)"
    )


if __name__ == "__main__":
    main()
