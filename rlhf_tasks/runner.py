"""How a stage runs as part of the pipeline: the one function the CLI (``rlhf stage``, ``rlhf
run``) and the Prefect flow call.

``run_stage`` runs a registry stage (``rlhf_tasks/stages.py``) on its registry locations:

1. under ``accelerate launch`` when its trainer's ``resources.num_processes`` asks for several
   processes (``launch.py``; the launched main process tracks it, the others only train);
2. as an MLflow run nested under the pipeline's (``tracking/runs.py``), with the stage's
   per-step metrics and progress wired to that run and to its Prefect task;
3. then, once it and its run are complete: its checkpoints are removed (a run whose tracking
   failed keeps them, and its rerun resumes at the end of training), and DVC records it in
   ``dvc.lock`` and its cache (``lockfile.record``).

``is_cached`` is DVC's decision that a stage need not run; ``cached_result`` is what such a
stage returns: its output locations and the metrics its last run wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rlhf_tasks import launch, lockfile
from rlhf_tasks.config import Params
from rlhf_tasks.stages import STAGES, Stage
from rlhf_tasks.tracking import progress, runs


def run_stage(name: str, params: Params, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run stage ``name`` (see the module docstring); return its result."""
    stage = STAGES[name]
    section = stage.trainer_section(params) if stage.trainer_section else None
    processes = launch.num_processes(section, params)
    if processes > 1 and not launch.inside():
        result = launch.run(name, params, processes, parent_run_id)
    elif launch.inside() and not launch.is_main():
        return stage.function()(params, stage.io())  # the main process tracks the stage
    else:
        hooks = {
            "log_step": progress.log_step,
            "progress": lambda fraction: progress.report_progress(name, fraction),
        }
        with runs.stage_run(stage, params, parent_run_id) as result:
            result.update(stage.function()(params, stage.io(**hooks)))
    if not launch.inside():  # the launcher's process finishes what every process did
        finish(stage, params)
    return result


def finish(stage: Stage, params: Params) -> None:
    """After a stage succeeded (and was tracked): remove its checkpoints, record it in DVC."""
    if stage.trains:
        shutil.rmtree(stage.io().checkpoints, ignore_errors=True)
    why = lockfile.record(stage, params)
    if why and not os.environ.get("DVC_STAGE"):
        print(f"stage {stage.name}: not recorded in dvc.lock: {why}")


def is_cached(name: str, params: Params) -> bool:
    """Whether DVC finds stage ``name`` up to date, so that it need not run."""
    return lockfile.up_to_date(STAGES[name], params)


def cached_result(name: str) -> dict[str, Any]:
    """The result of a stage that did not run: its outputs, and the metrics its last run wrote."""
    stage = STAGES[name]
    metrics_file = stage.metrics_file()
    metrics = {}
    if metrics_file and Path(metrics_file).exists():
        metrics = json.loads(Path(metrics_file).read_text())
    return {"outputs": {role: out.path for role, out in stage.outputs.items()}, "metrics": metrics}
