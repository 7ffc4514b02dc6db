"""One pipeline run or ingestion at a time per project directory.

``rlhf run``, ``rlhf ingest`` and the flows a Prefect worker runs (``rlhf_pipeline``,
``rlhf_ingest``) take the same lock, the OS's ``flock`` on ``artifacts/.run.lock``, so two of them
never race on ``artifacts/``, ``data/`` or the registry's aliases, and an ingestion cannot change
the data a retraining is reading. A command is refused at once (BusyError, exit 3: a person is
waiting for it); a flow run that a worker started waits for its turn and says for whom, up to a
limit. The lock is the OS's: a killed holder leaves none behind. It is per machine (``flock``
does not reach across machines; on shared storage each machine locks only its own processes).

Within one process it is reentrant: ``rlhf run`` holds it and then runs the flow in-process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from rlhf_tasks.errors import BusyError

LOCK = Path("artifacts/.run.lock")
POLL_S = 1.0  # how often a waiting flow run tries again
_depth = [0]  # how deep this process is inside hold()


@contextlib.contextmanager
def hold(
    what: str, wait_s: float | None = None, say: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold the project while the block runs; ``what`` names the holder for anyone refused.
    ``wait_s`` None: refuse at once if another process holds it (BusyError); else wait up to
    that many seconds, telling ``say`` once whom it waits for."""
    if _depth[0]:
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
        return
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a+") as fh:
        _acquire(fh, wait_s, say)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{what} (pid {os.getpid()}, started {time.strftime('%H:%M:%S')})")
        fh.flush()
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
            fh.seek(0)
            fh.truncate()


def _acquire(fh: IO[str], wait_s: float | None, say: Callable[[str], None]) -> None:
    deadline = None if wait_s is None else time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
        if deadline is None:
            raise BusyError(
                f"{holder} is running in this project ({LOCK}); wait for it to finish, or run "
                "from another checkout"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise BusyError(
                f"waited {wait_s:.0f} s (orchestration.slot_timeout_s) for {holder} to finish in "
                f"this project ({LOCK.resolve()}); it still runs"
            )
        if not told:
            say(f"waiting for {holder} to finish in this project ({LOCK.resolve()})")
            told = True
        time.sleep(min(POLL_S, left))
