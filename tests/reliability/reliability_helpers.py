"""What the reliability tests share: a small, fast project; `rlhf run` as a real process that a
test can watch and kill (SIGKILL to its whole process group, as an OOM killer or a preempted
machine would); a real `mlflow server` that a test can stop and start again."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from helpers import BIN, env, make_dvc_repo, shrink_data

# Enough steps that each training stage writes a checkpoint well before it ends, few enough that
# a whole `rlhf run` takes about half a minute on 2 CPU cores.
FAST = {
    "validate": {"min_rows": 10},
    "sft": {
        "args": {
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "save_steps": 2,
            "logging_steps": 1,
        }
    },
    "reward": {
        "eval_batch_size": 32,
        "args": {
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "save_steps": 2,
            "logging_steps": 1,
        },
    },
    "ppo": {
        "total_episodes": 32,
        "rollout_batch_size": 8,
        "mini_batch_size": 8,
        "ppo_epochs": 1,
        "response_length": 8,
        "save_every": 1,
    },
    "evaluate": {"samples_per_prompt": 1, "max_new_tokens": 8},
    # Any policy is promoted: these tests are about how runs fail, not about model quality.
    "promote": {"min_win_rate": 0.0, "min_reward_model_accuracy": 0.0, "required_checks": []},
}


def make_fast(project: Path) -> Path:
    """Shrink the ``project`` fixture's data (``shrink_data``) and training to the sizes above,
    and make it a DVC repository with the stages' code (dvc.yaml's deps): DVC decides which
    stages a run reuses, from what the runs before it recorded in dvc.lock."""
    shrink_data(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    _merge(params, FAST)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return make_dvc_repo(project)


def _merge(into: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class Run:
    """``rlhf run`` in ``project`` as its own process group; output in ``log``."""

    def __init__(
        self,
        project: Path,
        log: Path,
        extra_env: dict[str, str] | None = None,
        overrides: tuple[str, ...] = (),
    ):
        self.log = log
        environment = {**env(), "PYTHONUNBUFFERED": "1"}  # a killed run's output is all there
        environment.update(extra_env or {})
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "rlhf"), "run", *(f"-S{o}" for o in overrides)],
                cwd=project,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the Prefect API server too
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
        """Poll ``condition`` until it holds; fail (showing the output) if the run ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, (
                f"rlhf run exited {self.proc.returncode} before {what}:\n{self.output()}"
            )
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.output()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL to the whole process group: nothing gets to clean up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"rlhf run still running after {timeout} s:\n{self.output()}"
            ) from None


def complete_checkpoint(checkpoints: Path, name: str, marker: str) -> Callable[[], bool]:
    """A condition: a directory of ``checkpoints`` named ``name`` (a regular expression) holds
    ``marker``, the file its trainer writes last: a complete checkpoint on disk."""
    pattern = re.compile(name)
    return lambda: (
        checkpoints.is_dir()
        and any(pattern.fullmatch(d.name) and (d / marker).exists() for d in checkpoints.iterdir())
    )


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend and artifact root under ``root``)
    that a test can stop and start again on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            # No job runner: its consumer processes are not needed here and may outlive the
            # server.
            env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=(self.root / "server.log").open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped as a group: the server and its workers
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                log = (self.root / "server.log").read_text()
                assert self.proc.poll() is None, f"mlflow server exited:\n{log}"
                assert time.monotonic() < deadline, f"mlflow server did not start:\n{log}"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 30
        while True:  # its workers too: nothing answers on the port any more
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            assert time.monotonic() < deadline, f"port {self.port} still answers"
            time.sleep(0.1)
