"""Prefect flow ``rlhf_pipeline``: the stages of the registry (``rlhf_tasks/stages.py``), in
order, as tasks.

Thin by design: each task is the stage's own function (``runner.run_stage``), tracked as a nested
MLflow run under the flow's parent run and recorded in ``dvc.lock``. The flow adds what Prefect is
for:

- skipping unchanged stages: a stage that DVC finds up to date (``dvc status``: its data, code,
  params and upstream outputs are those its ``dvc.lock`` entry records; ``rlhf_tasks/
  lockfile.py``) is not run; its task ends ``Cached`` with the outputs and metrics on disk;
- timeouts per stage and retries with backoff for ``promote`` (MLflow I/O);
- concurrency: training stages hold a slot of the ``gpu`` global concurrency limit, ``promote``
  the one slot of ``promotion``, so two runs never train on one GPU or race on aliases;
- artifacts: the validation report when the gate fails, the evaluation report with the
  promotion decision, and PPO's progress while it trains.

A failed stage fails the flow at once; stages after it do not run, so nothing is registered.
A mistake in the params (a TRL argument, a model that is missing, ships its own code or only
pickled weights: ``rlhf_tasks/preflight.py``) fails the flow before its first stage.

    python -m flows.pipeline            # in-process, on Prefect's ephemeral API
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.states import Completed

from flows import logs, reports
from flows.api import server_api
from rlhf_tasks import environment, preflight, projectlock
from rlhf_tasks.config import DEFAULT_PARAMS, Params, load_params
from rlhf_tasks.errors import ConfigError, UserError
from rlhf_tasks.runner import cached_result, is_cached, run_stage
from rlhf_tasks.stages import STAGES
from rlhf_tasks.tracking import runs

RETRIED = {"promote"}  # idempotent on failure: promote removes what it registered


def _stage_task(name: str, params: Params) -> Any:
    orch = params.orchestration
    retries = orch.retries if name in RETRIED else 0
    return task(
        _run_unless_cached,
        name=name,
        task_run_name=name,
        # Prints reach Prefect's log through flows/logs.py, not log_prints (see there).
        log_prints=False,
        cache_policy=NO_CACHE,  # DVC decides what is unchanged (_run_unless_cached), not Prefect
        timeout_seconds=orch.timeouts.get(name),
        retries=retries,
        retry_delay_seconds=[orch.retry_delay_s * 2**i for i in range(retries)] or 0,
    )


def _run_unless_cached(name: str, params: Params, parent_run_id: str) -> Any:
    if params.orchestration.cache and is_cached(name, params):
        return Completed(name="Cached", data=cached_result(name), message="unchanged (DVC)")
    with logs.stage_output():  # what the stage prints, in the run's Prefect log too
        return _run_with_slots(name, params, parent_run_id)


def _run_with_slots(name: str, params: Params, parent_run_id: str) -> Any:
    try:
        return _run_in_slot(name, params, parent_run_id)
    except UserError as exc:
        return logs.user_failure(exc)


def _run_in_slot(name: str, params: Params, parent_run_id: str) -> dict[str, Any]:
    orch = params.orchestration
    limit = (
        orch.gpu_limit
        if STAGES[name].trains
        else orch.promotion_limit
        if name == "promote"
        else None
    )
    if limit is None or not server_api():
        return run_stage(name, params, parent_run_id)
    try:
        with concurrency(limit, occupy=1, strict=True, timeout_seconds=orch.slot_timeout_s):
            return run_stage(name, params, parent_run_id)
    except TimeoutError:
        raise RuntimeError(
            f"stage {name} waited {orch.slot_timeout_s:.0f} s for a slot of the concurrency limit "
            f"{limit!r}; see who holds it with `prefect gcl inspect {limit}`"
        ) from None


def _ensure_limits(params: Params) -> None:
    """Create the global concurrency limits if this Prefect API has none of these names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    orch = params.orchestration
    with get_client(sync_client=True) as client:
        for name, slots in ((orch.gpu_limit, orch.gpu_slots), (orch.promotion_limit, 1)):
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=slots)
                )


@flow(name="rlhf_pipeline")
def rlhf_pipeline(
    params_path: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None
) -> dict[str, Any]:
    environment.set_defaults()  # a worker runs this flow without the `rlhf` command
    try:
        return _pipeline(params_path, overrides)
    except UserError as exc:
        return logs.user_failure(exc)


def _pipeline(params_path: str, overrides: list[str] | None) -> dict[str, Any]:
    params = load_params(params_path, overrides or [])
    unknown = set(params.orchestration.timeouts) - set(STAGES)
    if unknown:
        raise ConfigError(f"orchestration.timeouts: no such stage(s): {', '.join(sorted(unknown))}")
    preflight.check(params)  # every stage's arguments and models, before the first stage runs
    # One run or ingestion at a time in this project: a worker's run waits its turn (the
    # `rlhf` command holds the lock already and is refused instead).
    wait_s = params.orchestration.slot_timeout_s
    with projectlock.hold("the flow rlhf_pipeline", wait_s, logs.say):
        return _stages(params, params_path)


def _stages(params: Params, params_path: str) -> dict[str, Any]:
    if server_api():
        _ensure_limits(params)
    results: dict[str, Any] = {}
    with runs.pipeline_run(params, params_path) as parent:
        for name in STAGES:
            state = _stage_task(name, params)(name, params, parent.info.run_id, return_state=True)
            if state.is_failed() and name == "validate":
                reports.validation_artifact(Path(STAGES["validate"].outputs["report"].path))
            results[name] = state.result()  # raises: a failed stage fails the flow here
            if name == "validate":  # the version the run is pinned to (rlhf_tasks/dataversion.py)
                runs.tag_data_version(parent.info.run_id, params)
            if state.name == "Cached":
                runs.note_cached(name)
        reports.evaluation_artifact(results, parent.info.run_id)
    return results


if __name__ == "__main__":
    rlhf_pipeline()
