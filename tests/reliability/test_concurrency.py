"""Concurrency: one `rlhf run` or `rlhf ingest` at a time per project. A second is refused at
once (exit 3, before it reads data, trains or touches the registry, so two runs can never race on
artifacts/, data/ or the champion/challenger aliases) and says who holds the project; a finished
or killed holder leaves no lock behind. (Against a Prefect server, runs of several projects
share the GPU and promotion concurrency limits: tests/flows/test_team_scale.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rlhf_tasks.cli import LOCK, project_lock


def test_a_second_run_is_refused_while_one_holds_the_project(project: Path, rlhf) -> None:
    with project_lock("run"):
        code, _, err = rlhf("run")
        assert code == 3, err
        assert "`rlhf run` (pid" in err and "is running in this project" in err
        code, _, err = rlhf("ingest", "batch.jsonl")
        assert code == 3, err
    # Released: the next command gets past the lock (and stops at its own check).
    code, _, err = rlhf("ingest", "batch.jsonl")
    assert code == 2 and "batch.jsonl: no such file" in err


def test_a_killed_holder_leaves_no_lock(project: Path, rlhf) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from rlhf_tasks.cli import project_lock\n"
            "with project_lock('run'):\n    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = rlhf("ingest", "batch.jsonl")
        assert code == 3 and f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the OS drops a dead process's lock; nothing to clean up by hand
        code, _, err = rlhf("ingest", "batch.jsonl")
        if code == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert code == 2, err
    assert LOCK.exists()  # the file stays; only the OS lock on it matters
