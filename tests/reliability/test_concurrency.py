"""Concurrency: one `rlhf run` or `rlhf ingest` at a time per project. A second is refused at
once (exit 3, before it reads data, trains or touches the registry, so two runs can never race on
artifacts/, data/ or the champion/challenger aliases) and says who holds the project; a finished
or killed holder leaves no lock behind. A flow run that a worker starts waits for its turn
instead (tests/flows/test_pipeline_flow.py runs one). (Against a Prefect server, runs of several
projects share the GPU and promotion concurrency limits: tests/flows/test_team_scale.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import hold_project

from rlhf_tasks.errors import BusyError
from rlhf_tasks.projectlock import LOCK, hold


def test_a_second_run_is_refused_while_one_holds_the_project(project: Path, rlhf) -> None:
    holder = hold_project()
    try:
        code, _, err = rlhf("run")
        assert code == 3, err
        assert f"`rlhf run` (pid {holder.pid}" in err and "is running in this project" in err
        code, _, err = rlhf("ingest", "batch.jsonl")
        assert code == 3, err
    finally:
        holder.kill()
        holder.wait()
    # Released: the next command gets past the lock (and stops at its own check).
    code, _, err = rlhf("ingest", "batch.jsonl")
    assert code == 2 and "batch.jsonl: no such file" in err


def test_a_killed_holder_leaves_no_lock(project: Path, rlhf) -> None:
    holder = hold_project()
    try:
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


def test_a_waiting_holder_says_whom_it_waits_for_and_gets_its_turn(project: Path) -> None:
    """How a worker's flow run takes the project: it waits (saying once for whom), then holds
    it; within one process the lock is reentrant (`rlhf run` holds it, then runs the flow)."""
    holder = hold_project(seconds=2)
    said: list[str] = []
    try:
        with hold("the flow rlhf_ingest", wait_s=60, say=said.append):
            assert holder.stdout.readline().strip() == "released"  # it had let go first
            with hold("the flow rlhf_pipeline", wait_s=0.1):  # the same process: no wait
                pass
    finally:
        holder.kill()
        holder.wait()
    assert len(said) == 1 and said[0].startswith(f"waiting for `rlhf run` (pid {holder.pid}"), said


def test_a_waiting_holder_gives_up_after_its_limit(project: Path) -> None:
    holder = hold_project()
    try:
        waiting = hold("the flow rlhf_pipeline", wait_s=1, say=lambda _: None)
        with pytest.raises(BusyError, match=r"waited 1 s .* for `rlhf run` \(pid"), waiting:
            pass
    finally:
        holder.kill()
        holder.wait()
