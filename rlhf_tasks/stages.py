"""The one list of pipeline stages, in the order they run.

Each entry maps a stage name (also its ``params.yaml`` section, its ``dvc.yaml`` stage, its
module and its Prefect task) to the stage's entry function: ``fn(params) -> {"outputs": {...},
"metrics": {...}}``. The CLI (``rlhf stage NAME``), the Prefect flow and the tests all use this
list; ``tests/code/test_stages.py`` keeps ``dvc.yaml`` in agreement with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhf_tasks import base_model, evaluate, policy, reward, sft, validate
from rlhf_tasks.config import Params

StageFn = Callable[[Params], dict[str, Any]]

STAGES: dict[str, StageFn] = {
    "base_model": base_model.build,
    "validate": validate.run,
    "sft": sft.run,
    "reward": reward.run,
    "policy": policy.run,
    "evaluate": evaluate.run,
}
