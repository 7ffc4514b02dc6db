"""Which Prefect API the flows talk to: a server (``PREFECT_API_URL``) or a temporary one.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server the first time a flow calls
its API, and waits for it: seconds of importing the server in this process, then seconds of the
server process booting, before the first task runs. ``temporary_api()`` starts the same server
process (Prefect's own app, ``prefect.server.api.server:create_app`` under uvicorn, on
127.0.0.1, with the settings Prefect gives its temporary server) *before* the pipeline is
imported, so the server boots on another core while this process loads torch, transformers and
MLflow; the flow then finds ``PREFECT_API_URL`` set and connects at once. This is most of the
fixed cost of an ``rlhf run`` whose stages are all cached (``bench/cached_rerun.py``).

The server is stopped when the block ends, and, on Linux, also when this process dies (a killed
``rlhf run`` leaves no server behind).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

_TEMPORARY: list[str] = []  # the API URL of the temporary server this process started, if any


def server_api() -> bool:
    """Whether the flow talks to a Prefect server rather than to a temporary one. Only a
    server's services revoke the concurrency-slot lease of a run that was killed; on a
    temporary API that slot would stay taken for good, so there (one user, one machine, the
    embedded default) the concurrency limits are not used."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return bool(url) and url not in _TEMPORARY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """A function for the child to run between fork and exec (nothing that imports or locks):
    Linux's PR_SET_PDEATHSIG, so that the server gets SIGTERM when this process dies."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class TemporaryAPI:
    """A Prefect API server process on 127.0.0.1, as Prefect's ephemeral mode runs it."""

    def __init__(self) -> None:
        # Not `import prefect` (seconds): the server should be booting while this process does.
        package = Path(importlib.util.find_spec("prefect").origin).parent
        port = str(_free_port())
        self.url = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",  # no background services, as Prefect's own
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        app = ["--app-dir", str(package.parent), "prefect.server.api.server:create_app"]
        options = ["--factory", "--host", "127.0.0.1", "--port", port, "--log-level", "error"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *app, *options, "--lifespan", "on"],
            env=env,
            preexec_fn=_die_with_parent(),
        )

    def wait(self) -> None:
        """Block until the server answers its health check (Prefect's startup timeout)."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the temporary Prefect API server exited with code {self.process.returncode}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect API server at {self.url} did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _server_set() -> bool:
    """Whether Prefect's settings name an API (or forbid a temporary one)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return bool(PREFECT_API_URL.value()) or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()


@contextlib.contextmanager
def temporary_api() -> Iterator[TemporaryAPI | None]:
    """Start a temporary Prefect API when none is configured (no ``PREFECT_API_URL``, and
    Prefect's ephemeral mode allowed), point Prefect at it for the block, stop it after.
    Yields the server (call ``wait()`` before the first flow), or None when a server is set."""
    if os.environ.get("PREFECT_API_URL") or ("prefect" in sys.modules and _server_set()):
        yield None
        return
    server = TemporaryAPI()  # before importing Prefect (when not yet): see the module docstring
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    if _server_set():
        server.stop()  # a server is set in the Prefect profile, or ephemeral mode is off
        yield None
        return
    _TEMPORARY.append(server.url)
    try:
        # No UI URL: the temporary server serves no UI, and it is gone when the run ends.
        with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_UI_URL: ""}):
            try:
                yield server
            finally:
                _drain_prefect_workers()
    finally:
        server.stop()
        _TEMPORARY.remove(server.url)


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues in the background (its exit handlers would,
    after the server is gone, and retry for a minute); as Prefect's own test harness does."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30)
