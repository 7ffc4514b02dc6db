"""The process defaults of this tool's entry points: the ``rlhf`` command and the Prefect flows
(which a worker runs without the command). Nothing else in the project sets environment
variables, and importing a module never does: a library user's process is left as it is.
"""

from __future__ import annotations

import os

from rlhf_tasks.tracking.store import HTTP_DEFAULTS

# Privacy by default: no analytics or telemetry from the libraries this tool drives.
PRIVACY = {
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


# MLflow's asynchronous logging (the trainers' per-step metrics) sends what its queue holds each
# second, merged into batches, instead of one request per call; and ending a run or flushing no
# longer waits out the queue's 1-second poll: without it each of a run's ~9 MLflow runs waited
# about a second when it ended (measured: 1.07 s against 0.06 s per run with 5 async calls).
ASYNC_LOGGING = {"MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}


# No progress bar for loading or saving a model (transformers draws one per load: dozens a run,
# for models that load in milliseconds) nor for hub downloads; the trainers' bars (tqdm's own)
# stay. Read when transformers is imported: the entry points set it before.
QUIET_LOADING = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def set_defaults() -> None:
    """Set the privacy defaults, MLflow's HTTP retry and async-logging defaults and quiet model
    loading where the user set none."""
    for var, value in {**PRIVACY, **HTTP_DEFAULTS, **ASYNC_LOGGING, **QUIET_LOADING}.items():
        os.environ.setdefault(var, value)
