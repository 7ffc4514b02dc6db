"""A training stage's progress: per-step metrics to the MLflow run, a Prefect progress artifact."""

from __future__ import annotations

import sys
import time
from typing import Any


def active() -> bool:
    """Whether an MLflow run is active in this process (the stage is being tracked)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and mlflow.active_run() is not None


def log_step(metrics: dict[str, Any], step: int) -> None:
    """Log a training step's numeric metrics to the active run, if there is one."""
    if active():
        import mlflow

        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        mlflow.log_metrics(numeric, step=step, synchronous=False)


_progress: dict[str, Any] = {}  # stage -> (task run id, artifact id, last update time)
PROGRESS_EVERY_S = 10.0


def report_progress(stage: str, fraction: float) -> None:
    """A Prefect progress artifact for ``stage`` (0 to 100%), when it runs as a Prefect task.
    Updated at most every ``PROGRESS_EVERY_S`` seconds, and at 100%: each update is a call to
    the Prefect API, and the server's work competes with training for the CPU."""
    if "prefect" not in sys.modules:
        return
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return
    percent = round(100 * min(max(fraction, 0.0), 1.0), 1)
    run_key = f"{context.task_run.id}"
    now = time.monotonic()
    if _progress.get(stage, (None,))[0] != run_key:
        artifact = create_progress_artifact(
            progress=percent, key=f"{stage}-progress", description=f"{stage} training progress"
        )
        _progress[stage] = (run_key, artifact, now)
    elif percent >= 100 or now - _progress[stage][2] >= PROGRESS_EVERY_S:
        update_progress_artifact(_progress[stage][1], percent)
        _progress[stage] = (run_key, _progress[stage][1], now)
