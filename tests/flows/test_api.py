"""The temporary Prefect API that `rlhf run` and `rlhf ingest` start when no server is set: it
answers on 127.0.0.1 while the block runs, is stopped after it, is not taken for a server (no
concurrency limits on it), and dies with the process that started it, even a killed one.

Each case runs in a fresh interpreter: this session's other flow tests use Prefect's test
harness, which names an API, and then ``temporary_api`` rightly starts nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts a Prefect API server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for the module: its database is created (migrated) once."""
    return tmp_path_factory.mktemp("prefect-home")


def _python(code: str, home: Path, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    environ.update(PREFECT_HOME=str(home), PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=environ,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


REPORT = """
import json, sys
from flows.api import server_api, temporary_api
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL
with temporary_api() as api:
    api.wait()
    print(json.dumps({"url": api.url, "pid": api.process.pid, "set": PREFECT_API_URL.value(),
                      "ui": PREFECT_UI_URL.value(), "server_api": server_api()}), flush=True)
    sys.stdin.readline() if WAIT else None
print(json.dumps({"after": PREFECT_API_URL.value()}), flush=True)
"""


def test_the_temporary_api_serves_the_block_and_stops_after(home: Path) -> None:
    proc = _python(REPORT.replace("WAIT", "False"), home)
    inside, after = (json.loads(line) for line in proc.stdout.read().splitlines())
    assert proc.wait(timeout=60) == 0
    assert inside["url"].startswith("http://127.0.0.1:") and inside["set"] == inside["url"]
    assert inside["ui"] == ""  # no links to a UI that is not served
    assert inside["server_api"] is False  # a temporary API: no concurrency limits
    assert after["after"] in (None, "")  # the settings are restored
    assert not _alive(inside["pid"]) and not _healthy(inside["url"])


def test_a_server_named_in_the_environment_is_used_instead(home: Path) -> None:
    code = (
        "from flows.api import server_api, temporary_api\n"
        "with temporary_api() as api:\n    print(api is None, server_api())"
    )
    proc = _python(code, home, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert proc.stdout.read().split() == ["True", "True"]
    assert proc.wait(timeout=60) == 0


def _listening(pid: int) -> set[str]:
    """The addresses the process ``pid`` and its children listen on."""
    import psutil

    server = psutil.Process(pid)
    return {
        conn.laddr.ip
        for proc in [server, *server.children(recursive=True)]
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_leaves_no_server_behind(home: Path) -> None:
    """The server dies with the process that started it; while it runs, it listens on
    127.0.0.1 only (the security rule of tests/reliability/test_security.py)."""
    proc = _python(REPORT.replace("WAIT", "True"), home)
    inside = json.loads(proc.stdout.readline())
    assert _healthy(inside["url"])
    assert _listening(inside["pid"]) == {"127.0.0.1"}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _alive(inside["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(inside["pid"]), "the server outlived the killed process"
