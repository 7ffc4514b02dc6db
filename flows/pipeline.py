"""Prefect flow ``rlhf_pipeline``: the stages of ``rlhf_tasks.stages.STAGES``, in order, as tasks.

Thin by design: each task is the stage's own function; the flow only orders them and fails at
the first stage that fails (a failed validation gate stops the run before any training).

    python -m flows.pipeline            # in-process, on Prefect's ephemeral API
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from rlhf_tasks.config import DEFAULT_PARAMS, load_params
from rlhf_tasks.stages import STAGES


@flow(name="rlhf_pipeline", log_prints=True)
def rlhf_pipeline(
    params_path: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None
) -> dict[str, Any]:
    params = load_params(params_path, overrides or [])
    results: dict[str, Any] = {}
    for name, stage in STAGES.items():
        results[name] = task(stage, name=name, task_run_name=name)(params)
    return results


if __name__ == "__main__":
    rlhf_pipeline()
