"""Prefect flow ``rlhf_ingest``: a new batch of preference pairs into the versioned data.

Each task is a thin step of ``rlhf_tasks/ingest.py``: check (the validation gate on the batch
and on the training set it would make), merge and version (append the new rows, ``dvc add``,
git commit ``data.dvc``), push (``dvc push``, retried), and optionally trigger the
``rlhf-retrain`` deployment. A batch that fails the gate fails the flow with the validation
report as an artifact, and ``data/`` and ``data.dvc`` are left exactly as they were.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.states import Failed, State

from flows import logs, reports
from rlhf_tasks import environment, ingest, projectlock
from rlhf_tasks.config import DEFAULT_PARAMS, load_params
from rlhf_tasks.errors import UserError

RETRAIN_DEPLOYMENT = "rlhf_pipeline/rlhf-retrain"


def _check(params: Any, batch: str) -> Any:
    """``ingest.check``; a rejected batch ends the task Failed with the verdict as its message,
    not as an exception with a traceback in the log."""
    try:
        return ingest.check(params, batch)
    except ingest.IngestRejected as exc:
        logs.to_run_log(str(exc))  # the verdict with file:row examples, in the run's log
        return Failed(message=str(exc).splitlines()[0], data=exc)


def start_retrain(params_path: str, overrides: list[str]) -> str:
    """Queue a run of the ``rlhf-retrain`` deployment (a worker picks it up) with this
    ingestion's params file and overrides, not the deployment's defaults; its flow run id."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        RETRAIN_DEPLOYMENT,
        parameters={"params_path": params_path, "overrides": list(overrides)},
        timeout=0,
    )
    return str(run.id)


@flow(name="rlhf_ingest")
def rlhf_ingest(
    batch: str,
    params_path: str = str(DEFAULT_PARAMS),
    overrides: list[str] | None = None,
    commit: bool = True,
    push: bool = True,
    retrain: bool = False,
) -> dict[str, Any] | State:
    environment.set_defaults()  # a worker runs this flow without the `rlhf` command
    try:
        params = load_params(params_path, overrides or [])
        # Not while a retraining reads the data (flows/pipeline.py): a worker's run waits.
        wait_s = params.orchestration.slot_timeout_s
        with projectlock.hold("the flow rlhf_ingest", wait_s, logs.say):
            return _ingest(params, params_path, overrides or [], batch, commit, push, retrain)
    except UserError as exc:
        return logs.user_failure(exc)


def _ingest(
    params: Any,
    params_path: str,
    overrides: list[str],
    batch: str,
    commit: bool,
    push: bool,
    retrain: bool,
) -> dict[str, Any] | State:
    state = task(_check, name="check", log_prints=True)(params, batch, return_state=True)
    if state.is_failed():
        for part in ("batch", "merged"):
            reports.validation_artifact(ingest.DEFAULT_OUT / part / "report.json")
        rejected = state.result(raise_on_failure=False)
        if isinstance(rejected, ingest.IngestRejected):
            # One message, no traceback: the flow run ends Failed with the gate's verdict (the
            # CLI prints it whole; the report is an artifact of the run).
            return Failed(message=str(rejected).splitlines()[0], data=rejected)
    checked = state.result()
    result = task(ingest.merge_and_version, name="merge_and_version")(params, checked, commit)
    result.update(rows=checked["rows"], duplicates=checked["duplicates"])
    if push and result["added"]:
        push_task = task(ingest.push, name="push", retries=3, retry_delay_seconds=[5, 10, 20])
        result["pushed"] = push_task(params)
    if retrain and result["added"]:
        result["retrain_flow_run"] = start_retrain(params_path, overrides)
    print(
        f"ingested {batch}: {result['added']} new pair(s), {result['duplicates']} already in the "
        f"data; data.dvc md5 {result['md5']}"
        + (", committed" if result.get("committed") else "")
        + (f", {result['pushed']} file(s) pushed" if "pushed" in result else "")
    )
    return result


if __name__ == "__main__":
    import sys

    rlhf_ingest(sys.argv[1])
