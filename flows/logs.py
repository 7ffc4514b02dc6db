"""What a stage prints for its user, in the Prefect run's log too.

A stage tells its user what happened with ``print``: the gate's verdict with ``file:line``
examples, the rows each trainer keeps, the trainers' loss lines (every ``logging_steps``), the
promotion decision. Under a worker that output goes to the worker's stdout, where nobody looks;
``stage_output()`` also sends each line of it to the Prefect API as a log of the running task, so
the UI and ``prefect flow-run logs`` show it. The console still shows it once: the lines go to
the API through a logger of their own that has only Prefect's API handler (Prefect's console
handler would print each twice).

Prefect's own ``log_prints`` is not used: it replaces ``print`` for the whole task, and output
that a library captures (dill's, under datasets' fingerprinting) would reach the log too. Here
only what reaches ``sys.stdout`` does. Progress bars (tqdm writes to stderr) stay on the console.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect.states import Failed, State

from rlhf_tasks.errors import UserError

LOGGER = "rlhf.stage_output"  # the name Prefect's log shows for these lines


def _api_logger() -> logging.Logger:
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not to the console handlers of the root or Prefect's loggers
    return logger


class _Tee(io.TextIOBase):
    """A text stream that writes to ``stream`` and logs each complete non-empty line."""

    def __init__(self, stream: Any, logger: logging.Logger) -> None:
        self._stream, self._logger = stream, logger
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._log(line)
        return written if written is not None else len(text)

    def _log(self, line: str) -> None:
        line = line.rstrip("\r")
        if line.strip():
            self._logger.info(line)

    def finish(self) -> None:
        with self._lock:
            rest, self._partial = self._partial, ""
        self._log(rest)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        # What else a library asks of stdout (``buffer``, ``errors``, ...) is the stream's own;
        # bytes written to ``buffer`` reach the console only.
        return getattr(self._stream, name)


@contextlib.contextmanager
def stage_output() -> Iterator[None]:
    """While it is open, each line written to ``sys.stdout`` is also a log of the current
    Prefect task run (its INFO level)."""
    tee = _Tee(sys.stdout, _api_logger())
    previous, sys.stdout = sys.stdout, tee
    try:
        yield
    finally:
        if sys.stdout is tee:
            sys.stdout = previous
        tee.finish()


def to_run_log(text: str) -> None:
    """Each line of ``text`` as a log of the current Prefect run, and not on the console (where
    the `rlhf` command prints the same text once, from the error it raises)."""
    logger = _api_logger()
    for line in text.splitlines():
        if line.strip():
            logger.info(line)


class _NoUselessTraceback(logging.Filter):
    """For Prefect's engine loggers: drops a record that carries a ``UserError`` as its
    exception, and the empty exception of a record logged with ``exc_info=True`` outside an
    ``except`` block (printed as "NoneType: None").

    The first is the traceback that Prefect's engine logs ("Engine execution exited with
    unexpected exception", Prefect 3.9's ``flow_engine.run_flow``) when a deployment's flow run
    ends Failed: it raises the failed state's error again to end the process. The user's message
    is in the run's log already, once; the traceback of a raised-again error tells them nothing
    more. The second follows "Task run failed with state: ..." for a task that returned a failed
    state. A bug (any other exception) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            return False
        if record.exc_info == (None, None, None):
            record.exc_info = None
        return True


# Installed when the flows are imported: in the `rlhf` command, in a worker's flow-run process.
for _engine in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_engine).addFilter(_NoUselessTraceback())


def user_failure(exc: UserError) -> State:
    """A failed state for a user's mistake (bad data, bad config, a busy project): its message,
    without the traceback Prefect would log for an exception, which tells the user nothing
    more. The ``rlhf`` command raises ``exc`` again from the state's data (its exit code)."""
    return Failed(message=f"{type(exc).__name__}: {exc}", data=exc)


def passed_on(state: State) -> State:
    """The failed state of a subflow, as its parent flow's own: same message, same error. (A
    flow that returns its subflow's state itself ends "Failed('1/1 states failed.')": Prefect
    takes a state of another run for a result, and the message and error are lost.)"""
    return Failed(message=state.message, data=state.result(raise_on_failure=False))


def quiet_failures(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` for a Prefect task whose user mistakes (``UserError``) end it Failed with the
    message, in the run's log once, instead of an exception and its traceback."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            to_run_log(str(exc))  # the whole message, once; the state says its first line
            return Failed(message=str(exc).splitlines()[0], data=exc)

    return run


def say(message: str) -> None:
    """A line for the user from a flow: the run's Prefect log (which the console shows too) in
    a flow run; the console when the flow's function is called outside one."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        get_run_logger().info(message)
    else:
        print(message)
