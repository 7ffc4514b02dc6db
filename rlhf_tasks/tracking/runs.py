"""MLflow runs: one per pipeline run, one nested run per stage, and where each is recorded."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_tasks import dataversion
from rlhf_tasks.config import Params
from rlhf_tasks.dataversion import DataVersion, data_version
from rlhf_tasks.stages import ARTIFACTS, STAGES, Stage
from rlhf_tasks.tracking.lineage import lineage
from rlhf_tasks.tracking.logged_models import log_model
from rlhf_tasks.tracking.store import (
    configure,
    current_experiment,
    redact_url,
    server_errors,
    tracking_uri,
)

RUNS_DIR = ARTIFACTS / "mlflow_runs"
# Files a stage writes next to its outputs that are worth keeping with the run.
_LOGGED_SUFFIXES = {".json", ".jsonl", ".md", ".png"}


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (lists stay whole, as their JSON)."""
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    value = json.dumps(tree) if isinstance(tree, list | None) else str(tree)
    return {prefix.rstrip("."): value}


def recorded_run(stage: str) -> dict[str, Any] | None:
    """What ``artifacts/mlflow_runs/<stage>.json`` says about the run that made its outputs."""
    path = RUNS_DIR / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else None


@contextlib.contextmanager
def _start(run_name: str, tags: dict[str, str], parent_run_id: str | None) -> Iterator[Any]:
    """An MLflow run for the block: FINISHED, FAILED on an error, or KILLED when the process is
    being stopped (SIGTERM from a worker cancelling the run, Ctrl-C: an exception that is not an
    ``Exception``), as runs of a killed process are ended later (``end_orphaned_runs``)."""
    import mlflow

    nested = mlflow.active_run() is not None
    if not nested and parent_run_id is None:
        end_orphaned_runs()
    with mlflow.start_run(
        run_name=run_name,
        nested=nested,
        parent_run_id=parent_run_id,
        tags={**tags, PROCESS_TAG: _this_process()},
    ) as run:
        try:
            yield run
        except BaseException as exc:
            if not isinstance(exc, Exception):
                mlflow.set_tag("rlhf.ended", f"KILLED: the process was stopped ({exc!r})")
                mlflow.end_run("KILLED")
            raise


# Which process a run belongs to: host, pid and the process's start time (pids are reused).
PROCESS_TAG = "rlhf.process"


def _this_process() -> str:
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time())}"


def end_orphaned_runs() -> list[str]:
    """End as KILLED the runs still RUNNING in this experiment whose process, on this machine,
    is gone: a killed ``rlhf run`` (SIGKILL, out of memory, a reboot) cannot end its own runs.
    Returns their ids. Runs of other machines are left alone: their processes cannot be seen."""
    import mlflow
    import psutil

    if "id" not in current_experiment:
        return []
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [current_experiment["id"]],
        f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` LIKE '{host}:%'",
    )
    ended = []
    for run in runs:
        _, pid, started = run.data.tags[PROCESS_TAG].rsplit(":", 2)
        try:
            if int(psutil.Process(int(pid)).create_time()) == int(started):
                continue  # still running
        except (psutil.Error, ValueError):
            pass
        client.set_tag(run.info.run_id, "rlhf.ended", f"KILLED: its process (pid {pid}) was gone")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def pipeline_run(params: Params, params_file: str | Path | None = None) -> Iterator[Any]:
    """The parent run of one pipeline run: lineage tags, every param, the params file."""
    import mlflow

    with server_errors("the pipeline's MLflow run"):
        configure(params)
        tags = {**lineage(params), "rlhf.stage": "pipeline"}
        with _start("rlhf_pipeline", tags, None) as run, server_errors("the pipeline"):
            mlflow.log_params(flatten(params.model_dump(mode="json", by_alias=True)))
            if params_file and Path(params_file).exists():
                mlflow.log_artifact(str(params_file))
            yield run


def data_read(stage: Stage, params: Params) -> DataVersion:
    """The version of the data ``stage`` reads. A stage after the gate reads the gate's
    validated copies: the version the gate pinned with them (``rlhf_tasks/dataversion.py``),
    whatever ``data/`` holds now. The gate, and a stage before it, read the files themselves."""
    return validated_version(params) if "validate" in stage.upstream() else data_version(params)


def validated_version(params: Params) -> DataVersion:
    """The version the gate's validated copies were made from (the files' own, for copies made
    before the gate pinned one); DVC's record of it if the data was tracked since
    (``dataversion.refreshed``)."""
    pinned = dataversion.pinned(Path(STAGES["validate"].outputs["data"].path))
    return dataversion.refreshed(pinned, params) if pinned is not None else data_version(params)


def tag_data_version(run_id: str, params: Params) -> None:
    """Tag a pipeline's parent run with the version its gate pinned (the data may have changed
    between the run's start and its gate)."""
    from mlflow import MlflowClient

    data = validated_version(params)
    client = MlflowClient()
    with server_errors("the pipeline's MLflow run"):
        client.set_tag(run_id, "rlhf.data_md5", data.md5)
        client.set_tag(run_id, "rlhf.data_dvc_tracked", str(data.tracked).lower())


def _log_inputs(stage: Stage, params: Params, data: DataVersion) -> None:
    """The data sets the stage reads, as MLflow inputs: the files of params' ``data`` section
    they were validated from, with the data version as digest."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    roles = [role for role in params.data.roles() if role in stage.inputs]
    if "data" in stage.inputs:  # the gate reads every data set
        roles = list(params.data.roles())
    for role in roles:
        source = LocalArtifactDatasetSource(str(Path(getattr(params.data, role)).resolve()))
        dataset = MetaDataset(source, name=role, digest=data.md5[:36])
        mlflow.log_input(dataset, context="eval" if "heldout" in role else "train")


def _log_files(stage: Stage, since: float) -> None:
    """Log the small files the stage wrote during this run (not models, data or checkpoints)."""
    import mlflow

    stage_dir = stage.workdir
    if not stage_dir.is_dir() or (stage_dir / "config.json").exists():  # a model directory
        return
    for path in sorted(stage_dir.iterdir()):
        fresh = path.is_file() and path.stat().st_mtime >= since
        if fresh and path.suffix in _LOGGED_SUFFIXES:
            mlflow.log_artifact(str(path))


def record_run(stage: str, **record: Any) -> None:
    """Write ``artifacts/mlflow_runs/<stage>.json``; URLs in it without their credentials."""
    record = {k: redact_url(v) if isinstance(v, str) else v for k, v in record.items()}
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RUNS_DIR / f".{stage}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(RUNS_DIR / f"{stage}.json")


@contextlib.contextmanager
def stage_run(stage: Stage, params: Params, parent_run_id: str | None = None) -> Iterator[dict]:
    """Track one stage: yields a dict the caller fills with the stage's result.

    On success the run gets the result's metrics, the stage's fresh files, its model (the
    stages that register one) and ``artifacts/mlflow_runs/<name>.json``. On failure the run ends
    FAILED with the files the stage did write (a failed gate's report) and no model; the record
    keeps pointing at the last run that succeeded. A tracking server that does not answer fails
    the stage with a TrackingServerError (``server_errors``).
    """
    with server_errors(f"stage {stage.name}"), _stage_run(stage, params, parent_run_id) as result:
        yield result


@contextlib.contextmanager
def _stage_run(stage: Stage, params: Params, parent_run_id: str | None) -> Iterator[dict]:
    import mlflow

    name = stage.name
    configure(params)
    started = time.time()
    data = data_read(stage, params)
    tags = {**lineage(params, data), "rlhf.stage": name}
    upstream = {}
    for other in stage.upstream():
        record = recorded_run(other)
        if record:
            upstream[other] = record["run_id"]
            tags[f"rlhf.upstream.{other}"] = record["run_id"]
    tags["rlhf.upstream_runs"] = json.dumps(upstream, sort_keys=True)
    result: dict[str, Any] = {}
    with _start(name, tags, parent_run_id) as run, server_errors(f"stage {name}"):
        dump = params.model_dump(mode="json", by_alias=True)
        mlflow.log_params(flatten({s: dump[s] for s in stage.sections if s in dump}))
        _log_inputs(stage, params, data)
        try:
            with server_errors(f"stage {name}"):  # before _log_files: it would wait again
                yield result
        finally:
            _log_files(stage, started)
        mlflow.flush_async_logging()  # the trainers' per-step metrics, logged asynchronously
        stepped = set(mlflow.get_run(run.info.run_id).data.metrics)
        final = {  # a metric with a per-step history already ends with its final value
            k: float(v)
            for k, v in result.get("metrics", {}).items()
            if isinstance(v, int | float) and k not in stepped
        }
        mlflow.log_metrics(final)
        model_id = None
        if stage.registers and "model" in result.get("outputs", {}):
            model_dir = Path(result["outputs"]["model"])
            model_id = log_model(stage, model_dir, params)
        record_run(
            name,
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            tracking_uri=tracking_uri(),
            model_id=model_id,
        )


def note_cached(stage: str) -> None:
    """On the active (pipeline) run: ``stage`` was not run, its outputs come from an earlier
    run (``rlhf.cached.<stage>`` = that run's id)."""
    import mlflow

    record = recorded_run(stage) or {}
    mlflow.set_tag(f"rlhf.cached.{stage}", record.get("run_id", "unknown"))
