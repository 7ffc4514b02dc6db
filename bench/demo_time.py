"""Wall time of the whole demo pipeline with the default params.yaml, stage by stage.

    .venv/bin/python bench/demo_time.py [--keep DIR] [-S section.key=value ...]

Copies the repository's git-tracked files into a scratch directory (a fresh clone, as `make demo`
starts from), generates the demo data, then runs `rlhf stage NAME` for every stage of
``rlhf_tasks.stages.STAGES`` in order, each as its own process (start-up and model loading
included, as `dvc repro` runs them). Prints each stage's wall time, the training time (sft +
reward + policy; the issue's target is under 5 minutes on 2 CPU cores), the total, and the key
metrics. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_copy import demo_copy

BIN = Path(sys.executable).parent
TRAINING = ("sft", "reward", "policy")


def main() -> None:
    from rlhf_tasks.stages import STAGES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in DIR and keep it (default: a temp dir)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    overrides = [x for o in args.overrides for x in ("-S", o)]

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp) / "demo"
        demo_copy(work, env)

        import torch

        print(
            f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, CUDA: {torch.cuda.is_available()}"
        )
        times: dict[str, float] = {}
        for name in STAGES:
            start = time.perf_counter()
            subprocess.run(
                [BIN / "rlhf", "stage", name, *overrides],
                cwd=work,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            times[name] = time.perf_counter() - start
            print(f"  {name:<12} {times[name]:7.1f} s", flush=True)
        training = sum(times[name] for name in TRAINING)
        print(f"  {'training':<12} {training:7.1f} s  (sft + reward + policy; target < 300 s)")
        print(f"  {'total':<12} {sum(times.values()):7.1f} s\n")
        subprocess.run([BIN / "rlhf", "metrics"], cwd=work, env=env, check=True)


if __name__ == "__main__":
    main()
