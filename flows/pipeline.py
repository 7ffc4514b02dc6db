"""Prefect flow ``rlhf_pipeline``: the stages of ``rlhf_tasks.stages.STAGES``, in order, as tasks.

Thin by design: each task is the stage's own function, tracked as a nested MLflow run under the
flow's parent run; the flow only orders them and fails at the first stage that fails (a failed
validation gate stops the run before any training, and nothing is registered).

    python -m flows.pipeline            # in-process, on Prefect's ephemeral API
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from rlhf_tasks import tracking
from rlhf_tasks.config import DEFAULT_PARAMS, load_params
from rlhf_tasks.stages import STAGES, run_stage


@flow(name="rlhf_pipeline", log_prints=True)
def rlhf_pipeline(
    params_path: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None
) -> dict[str, Any]:
    params = load_params(params_path, overrides or [])
    results: dict[str, Any] = {}
    with tracking.pipeline_run(params, params_path) as parent:
        for name in STAGES:
            # Prints stay prints: log_prints would swap out `print`, and libraries that capture
            # stdout (dill, under datasets' fingerprinting) would spill into the log.
            stage_task = task(run_stage, name=name, task_run_name=name, log_prints=False)
            results[name] = stage_task(name, params, parent.info.run_id)
    return results


if __name__ == "__main__":
    rlhf_pipeline()
