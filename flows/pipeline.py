"""Prefect flow ``rlhf_pipeline``: the stages of ``rlhf_tasks.stages.STAGES``, in order, as tasks.

Thin by design: each task is the stage's own function (``stages.run_stage``), tracked as a nested
MLflow run under the flow's parent run. The flow adds what Prefect is for:

- caching across runs: a stage whose cache key (``rlhf_tasks/cache.py``: data, its params
  sections, its upstream outputs, its code) is unchanged, and whose outputs are still on disk as
  it left them, is not run; its task ends ``Cached`` with the previous result;
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

import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.concurrency.sync import concurrency
from prefect.filesystems import LocalFileSystem
from prefect.states import Failed, State

from flows import reports
from flows.api import server_api
from rlhf_tasks import cache, preflight, tracking
from rlhf_tasks.config import DEFAULT_PARAMS, Params, load_params
from rlhf_tasks.errors import ConfigError, UserError
from rlhf_tasks.stages import STAGES, run_stage

TRAINING = {"sft", "reward", "policy"}
RETRIED = {"promote"}  # idempotent on failure: promote removes what it registered


def _stage_task(name: str, params: Params, cache_key: str, reuse: bool, storage: str) -> Any:
    orch = params.orchestration
    retries = orch.retries if name in RETRIED else 0
    return task(
        _run_with_slots,
        name=name,
        task_run_name=name,
        # Prints stay prints: log_prints would swap out `print`, and libraries that capture
        # stdout (dill, under datasets' fingerprinting) would spill into the log.
        log_prints=False,
        cache_key_fn=lambda *_: cache_key,
        refresh_cache=not reuse,
        persist_result=True,
        result_serializer="json",
        result_storage=storage,
        timeout_seconds=orch.timeouts.get(name),
        retries=retries,
        retry_delay_seconds=[orch.retry_delay_s * 2**i for i in range(retries)] or 0,
    )


def _run_with_slots(name: str, params: Params, parent_run_id: str) -> Any:
    try:
        return _run_in_slot(name, params, parent_run_id)
    except UserError as exc:
        return _user_failure(exc)


def _user_failure(exc: UserError) -> State:
    """A failed state for a user's mistake (bad data, bad config): its message, without the
    traceback Prefect would log for an exception, which tells the user nothing more."""
    return Failed(message=f"{type(exc).__name__}: {exc}", data=exc)


def _run_in_slot(name: str, params: Params, parent_run_id: str) -> dict[str, Any]:
    orch = params.orchestration
    limit = (
        orch.gpu_limit if name in TRAINING else orch.promotion_limit if name == "promote" else None
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


def _result_storage() -> str:
    """A block for this project's cached results (``artifacts/cache/results``), saved on the
    Prefect API under a name unique to the project directory; its slug."""
    basepath = (cache.CACHE_DIR / "results").resolve()
    name = "rlhf-results-" + hashlib.sha256(str(basepath).encode()).hexdigest()[:12]
    LocalFileSystem(basepath=str(basepath)).save(name, overwrite=True)
    return f"local-file-system/{name}"


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
    try:
        return _pipeline(params_path, overrides)
    except UserError as exc:
        return _user_failure(exc)


def _pipeline(params_path: str, overrides: list[str] | None) -> dict[str, Any]:
    params = load_params(params_path, overrides or [])
    unknown = set(params.orchestration.timeouts) - set(STAGES)
    if unknown:
        raise ConfigError(f"orchestration.timeouts: no such stage(s): {', '.join(sorted(unknown))}")
    preflight.check(params)  # every stage's arguments and models, before the first stage runs
    if server_api():
        _ensure_limits(params)
    storage = _result_storage()
    results: dict[str, Any] = {}
    with tracking.pipeline_run(params, params_path) as parent:
        for name in STAGES:
            key = cache.key(name, params)
            reuse = params.orchestration.cache and cache.reusable(name, key)
            state = _stage_task(name, params, key, reuse, storage)(
                name, params, parent.info.run_id, return_state=True
            )
            if state.is_failed() and name == "validate":
                reports.validation_artifact(Path("artifacts/validate/report.json"))
            results[name] = state.result()  # raises: a failed stage fails the flow here
            if state.name == "Cached":
                tracking.note_cached(name)
            else:
                cache.record(name, key)
        reports.evaluation_artifact(results, parent.info.run_id)
    return results


if __name__ == "__main__":
    rlhf_pipeline()
