"""The one list of pipeline stages, in the order they run.

Each entry maps a stage name (also its ``params.yaml`` section, its ``dvc.yaml`` stage, its
module and its Prefect task) to the stage's entry function: ``fn(params) -> {"outputs": {...},
"metrics": {...}}``. The CLI (``rlhf stage NAME``), the Prefect flow and the tests all use this
list; ``tests/code/test_stages.py`` keeps ``dvc.yaml`` in agreement with it.

``run_stage`` is how the CLI and the flow call a stage: tracked as an MLflow run (see
``rlhf_tasks/tracking.py``). The stage functions themselves know nothing of MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhf_tasks import (
    base_model,
    evaluate,
    launch,
    policy,
    promote,
    reward,
    sft,
    tracking,
    validate,
)
from rlhf_tasks.config import Params

StageFn = Callable[[Params], dict[str, Any]]

STAGES: dict[str, StageFn] = {
    "base_model": base_model.build,
    "validate": validate.run,
    "sft": sft.run,
    "reward": reward.run,
    "policy": policy.run,
    "evaluate": evaluate.run,
    "promote": promote.run,
}


def run_stage(name: str, params: Params, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run stage ``name`` as an MLflow run (nested under ``parent_run_id`` when given); under
    ``accelerate launch`` when its section asks for several processes (``launch.py``)."""
    processes = launch.num_processes(name, params)
    if processes > 1 and not launch.inside():
        return launch.run(name, params, processes, parent_run_id)
    if launch.inside() and not launch.is_main():
        return STAGES[name](params)  # the main process tracks the stage
    with tracking.stage_run(name, params, parent_run_id) as result:
        result.update(STAGES[name](params))
    return result
