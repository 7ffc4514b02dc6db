"""Multi-process stages: a stage whose section asks for ``resources.num_processes > 1`` runs as
``accelerate launch -m rlhf_tasks.cli stage NAME`` (DDP: one process per GPU, or gloo processes
on a CPU). The stage code is the same in every process: TRL's trainers and our PPO shard the
data across processes and save on the main one; only the main process is tracked in MLflow (as
the nested stage run, via ``RLHF_PARENT_RUN_ID``) and writes the stage's result for the caller.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from rlhf_tasks.config import Params

PARENT_RUN_ENV = "RLHF_PARENT_RUN_ID"
LAUNCHED_ENV = "RLHF_LAUNCHED"  # set for the launched processes: they never launch again


def num_processes(section: str | None, params: Params) -> int:
    """``resources.num_processes`` of the params section that configures a stage's trainer (1
    for a stage that trains nothing: ``section`` None)."""
    if section is None:
        return 1
    return getattr(params, section).resources.num_processes


def inside() -> bool:
    """Whether this process is one of several that a launcher started (this module, torchrun,
    accelerate)."""
    return LAUNCHED_ENV in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prefect_runner_cancels() -> bool:
    """Whether a Prefect runner (a worker's flow run) may cancel this process. It first sends
    the intent over its control channel, which the process acknowledges only while Prefect's
    own SIGTERM handler is installed (``prefect/_internal/control_listener.py``, Prefect 3.9),
    then sends SIGTERM to the process group. Another handler at that moment turns a clean
    ``Cancelled`` into ``Crashed``, so SIGTERM is left to Prefect there. (Private to Prefect:
    tests/flows/test_team_scale.py fails, the run ending Crashed, if this stops detecting it.)"""
    listener = sys.modules.get("prefect._internal.control_listener")
    return bool(getattr(listener, "_started", False))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(name: str, params: Params, processes: int, parent_run_id: str | None) -> dict[str, Any]:
    """Run stage ``name`` in ``processes`` processes; return the main process's result.

    What the processes print comes through this process: stdout as its own lines (so that a
    flow's ``logs.stage_output`` sends it to the Prefect run's log, as a single-process stage's),
    stderr (progress bars, warnings) to the console, its last lines kept for the error. A
    SIGTERM to this process reaches them (``_Forward``): PPO checkpoints the update it is in,
    as in one process."""
    forward = _Forward()  # outermost: a SIGTERM is delivered again once the files are removed
    with forward, tempfile.TemporaryDirectory(prefix=f"rlhf-{name}-") as tmp:
        params_file, result_file = Path(tmp) / "params.yaml", Path(tmp) / "result.json"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
        command = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--num_processes", str(processes),
            "--num_machines", "1",
            "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(_free_port()),
            # torchrun's launcher, also on a CPU: accelerate's own --cpu launcher starts one
            # process; the stages ask for a CPU state there, which makes gloo process groups.
            "--multi_gpu",
            "--mixed_precision", "no",
            "--dynamo_backend", "no",
            "-m", "rlhf_tasks.cli", "stage", name,
            "--params", str(params_file),
            "--result-file", str(result_file),
        ]  # fmt: skip
        env = {
            **os.environ,
            PARENT_RUN_ENV: parent_run_id or "",
            LAUNCHED_ENV: "1",
            "PYTHONUNBUFFERED": "1",  # lines as they are printed, not when a pipe buffer fills
        }
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        forward.attach(proc)
        relays = [_Relay(proc.stdout, sys.stdout, lines=True), _Relay(proc.stderr, sys.stderr)]
        try:
            code = proc.wait()
        except BaseException:  # this process is being stopped: see _stop
            _stop(proc)
            raise
        finally:
            for relay in relays:
                relay.join()
        if code != 0 or not result_file.exists():
            tail = "\n".join(relays[1].tail.splitlines()[-ERROR_LINES:])
            raise RuntimeError(
                f"stage {name} failed in {processes} processes under accelerate launch "
                f"(exit code {code}); the end of their error output:\n{tail}"
            )
        return json.loads(result_file.read_text())


ERROR_LINES = 30  # the lines of the processes' stderr a failure's message quotes
STOP_GRACE_S = 60  # how long stopped processes get to finish (PPO: the update it is in)


class _Relay(threading.Thread):
    """Copies a child's pipe to one of this process's streams, in the caller's context (so that
    Prefect's log handler knows the run each line belongs to); keeps the end of what it read."""

    def __init__(self, pipe: Any, stream: Any, lines: bool = False) -> None:
        super().__init__(daemon=True)
        self._pipe, self._stream, self._lines = pipe, stream, lines
        self._context = contextvars.copy_context()
        self.tail = ""
        self.start()

    def run(self) -> None:
        self._context.run(self._copy)

    def _copy(self) -> None:
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        read = self._pipe.readline if self._lines else functools.partial(self._pipe.read1, 4096)
        for chunk in iter(read, b""):
            text = decode(chunk)
            self.tail = (self.tail + text)[-20_000:]
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):  # the console went away: keep draining the pipe
                pass
        self._pipe.close()


class DeferredSigterm:
    """While open, a SIGTERM to this process is noted (``received``) instead of ending it; on
    leaving (or ``release()``) the previous handler is put back and, if one came, the SIGTERM is
    delivered to it again, so the process ends as it would have (the default: exit status 143;
    Prefect's handler: its termination). ``on_signal`` is called at each SIGTERM. Only in the
    main thread, and not in a flow run a Prefect worker may cancel: there Prefect's own handler
    must stay in place (``prefect_runner_cancels``)."""

    def __init__(self) -> None:
        self.enabled = (
            threading.current_thread() is threading.main_thread() and not prefect_runner_cancels()
        )
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> DeferredSigterm:
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True
        self.on_signal()

    def on_signal(self) -> None:
        """What to do at once when a SIGTERM comes (nothing: it is only noted)."""

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)
            self.enabled = False
            if self.received:
                os.kill(os.getpid(), signal.SIGTERM)


class _Forward(DeferredSigterm):
    """A SIGTERM to this process is passed on to the launched processes at once, and delivered
    again here once they have ended (a flow run a worker may cancel signals the whole process
    group itself)."""

    def __init__(self) -> None:
        super().__init__()
        self._proc: subprocess.Popen | None = None

    def attach(self, proc: subprocess.Popen) -> None:
        """The launched processes, once started (a SIGTERM before that is passed on now)."""
        self._proc = proc
        if self.received:
            self.on_signal()

    def on_signal(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)


def _stop(proc: subprocess.Popen) -> None:
    """This process is being stopped (Ctrl-C, Prefect's termination) while the launched ones
    run. They had the same signal (a terminal's Ctrl-C and a Prefect worker's cancellation
    signal the whole process group), so they get time to end as they would alone, then are
    stopped: SIGTERM, and SIGKILL after a few seconds more."""
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
