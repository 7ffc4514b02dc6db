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


def set_defaults() -> None:
    """Set the privacy defaults and MLflow's HTTP retry defaults where the user set none."""
    for var, value in {**PRIVACY, **HTTP_DEFAULTS}.items():
        os.environ.setdefault(var, value)
