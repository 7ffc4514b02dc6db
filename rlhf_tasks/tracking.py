"""MLflow tracking: one run per stage, nested under one run per pipeline run, lineage on each.

Every run carries the same lineage tags, so any model version can be walked back to the data,
code and parameters that made it:

    rlhf.git_commit, rlhf.git_dirty   the code (also as MLflow's own mlflow.source.git.commit)
    rlhf.data_md5                     the data version: the md5 in data.dvc
    rlhf.dvc_remote                   where DVC stores that version (the default remote's URL)
    rlhf.params_hash                  sha256 of the whole resolved params (all sections)
    rlhf.prefect_flow_run_id          when Prefect runs the pipeline
    rlhf.upstream.<stage>             the run id of each upstream stage whose outputs it read

A stage's run also holds the params of the sections it reads (as dvc.yaml lists them, flattened
as ``section.key``), its datasets as MLflow inputs (digest = the DVC md5, context train or eval),
its final metrics, the small files it wrote (metrics.json, reports, plots), and for ``reward``
and ``policy`` the model, logged with MLflow's transformers flavor. TRL's trainers log their
per-step metrics into the stage's run (``report_to="mlflow"``); PPO logs one step per update.

Where a stage's run is recorded: ``artifacts/mlflow_runs/<stage>.json`` (run id, model id,
store), which is how later stages find their upstream runs (outside every DVC output, so the
record never changes what ``dvc status`` sees). The store is ``MLFLOW_TRACKING_URI`` when set,
else ``sqlite:///mlflow.db`` in the project directory with artifacts in ``mlruns/``. URLs are
recorded without the credentials they may embed (``redact_url``): the store's in that file, the
DVC remote's in ``rlhf.dvc_remote``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rlhf_tasks.config import ModelConfig, Params
from rlhf_tasks.errors import ConfigError, TrackingServerError

ARTIFACTS = Path("artifacts")
RUNS_DIR = ARTIFACTS / "mlflow_runs"
# Stage outputs logged as MLflow models, with the transformers pipeline task they serve.
MODEL_TASKS = {"policy": "text-generation", "reward": "text-classification"}
# Files a stage writes next to its outputs that are worth keeping with the run.
_LOGGED_SUFFIXES = {".json", ".jsonl", ".md", ".png"}

# Privacy by default: MLflow's usage telemetry stays off unless the user turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# A tracking server that goes away: each request is retried with exponential backoff for about a
# minute (after 0, 4, 8, 16 and 32 s), so a server restart is waited for and a longer outage
# fails the run in bounded time (``server_errors``). MLflow's own defaults (7 retries, factor 2)
# wait over 4 minutes per request, and a failing run makes several. Set these variables to
# choose otherwise. MLFLOW_HTTP_REQUEST_TIMEOUT (120 s per attempt, for a server that accepts a
# connection and never answers) is left as it is: a large model's upload may need it.
RETRIES, BACKOFF = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
HTTP_DEFAULTS = {RETRIES: "5", BACKOFF: "2"}
for _var, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_var, _value)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded store: ``mlflow.db`` in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


_SECRET_QUERY = ("pass", "pwd", "token", "secret", "key", "signature", "credential")


def redact_url(url: str) -> str:
    """``url`` as it may be recorded or shown: without the user name and password it may embed
    (``http://user:token@host``, ``postgresql://user:pass@host/db``) and with the values of
    query parameters that hold secrets (``?password=...``, ``?X-Amz-Signature=...``) masked."""
    parts = urllib.parse.urlsplit(url)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    secret = [any(s in k.lower() for s in _SECRET_QUERY) for k, _ in pairs]
    if not parts.scheme or ("@" not in parts.netloc and not any(secret)):
        return url  # unchanged, not rebuilt (urlunsplit would turn sqlite://// into sqlite://)
    masked = [(k, "***" if hide else v) for (k, v), hide in zip(pairs, secret, strict=True)]
    return urllib.parse.urlunsplit(
        parts._replace(
            netloc=parts.netloc.rpartition("@")[2],
            query=urllib.parse.urlencode(masked, safe="*") if any(secret) else parts.query,
        )
    )


def configure(params: Params) -> None:
    """Point MLflow at the store and the experiment of ``params.tracking``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with server_errors(""):
        _experiment["id"] = mlflow.set_experiment(params.tracking.experiment).experiment_id


_experiment: dict[str, str] = {}  # the experiment configure() set


# -- a tracking server that does not answer ------------------------------------------------------

_guarded = [0]  # how deep this process is in server_errors blocks


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unanswered(exc: BaseException) -> BaseException | None:
    """The innermost cause if ``exc`` is MLflow's client giving up on a request to the tracking
    server (refused, timed out, or answered with errors, after its retries); else None."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    chain = list(_chain(exc))
    from mlflow.exceptions import MlflowException

    if any(
        isinstance(e, MlflowException) and str(e).startswith(f"API request to {uri.rstrip('/')}")
        for e in chain
    ):
        return chain[-1]
    return None


@contextlib.contextmanager
def server_errors(what: str) -> Iterator[None]:
    """Turn MLflow's client giving up on the tracking server into a TrackingServerError that
    names the server and the cause. From then on this process's requests are not retried (the
    runs it still ends would each wait the whole backoff again, for a run that has failed);
    the outermost block puts the retries back when it ends."""
    retries = os.environ.get(RETRIES)
    _guarded[0] += 1
    try:
        yield
    except Exception as exc:
        first = next((e for e in _chain(exc) if isinstance(e, TrackingServerError)), None)
        if first is not None and first is not exc:
            raise first from None  # the first failure, not that of ending a run after it
        cause = None if first is not None else _unanswered(exc)
        if cause is None:
            raise
        os.environ[RETRIES] = "0"
        raise TrackingServerError(_unanswered_message(what, cause, retries)) from exc
    finally:
        _guarded[0] -= 1
        if _guarded[0] == 0 and os.environ.get(RETRIES) == "0" and retries != "0":
            with contextlib.suppress(Exception):  # what is queued fails now, not at exit
                import mlflow

                mlflow.flush_async_logging()
            if retries is None:
                os.environ.pop(RETRIES, None)
            else:
                os.environ[RETRIES] = retries


def _unanswered_message(what: str, cause: BaseException, retries: str | None) -> str:
    tries = int(retries or 7)  # MLflow's own default
    factor = int(os.environ.get(BACKOFF) or 2)
    waited = factor * max(2**tries - 2, 0)
    reason = str(cause).strip() or type(cause).__name__
    server = redact_url(tracking_uri())
    return (
        f"{what}: " * bool(what) + f"the MLflow tracking server at {server} did not answer "
        f"({reason[:200]}), retried {tries} times over about {waited} s ({RETRIES}, {BACKOFF}). "
        "Once it is back, run again: the stages that completed are reused, and training "
        "resumes from its last checkpoint"
    )


def active() -> bool:
    """Whether an MLflow run is active in this process (the stage is being tracked)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and mlflow.active_run() is not None


def log_step(metrics: dict[str, Any], step: int) -> None:
    """Log a training step's numeric metrics to the active run, if there is one."""
    if active():
        import mlflow

        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        mlflow.log_metrics(numeric, step=step, synchronous=False)


# -- lineage ---------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version(params: Params) -> tuple[str, str]:
    """(md5, DVC remote URL) of the data directory, from ``<data.dir>.dvc`` and the DVC config;
    ``untracked`` / ``none`` when there is no such file or remote."""
    dvc_file = Path(f"{params.data.dir}.dvc")
    md5 = "untracked"
    if dvc_file.exists():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        md5 = str(outs[0].get("md5", "untracked"))
    remote = "none"
    with contextlib.suppress(Exception):  # no DVC repository here: no remote to name
        from dvc.config import Config

        config = Config.from_cwd(validate=False)
        name = config["core"].get("remote")
        if name:
            url = config["remote"][name]["url"]
            if "://" not in url and not Path(url).is_absolute():  # relative to .dvc/
                url = str((Path(".dvc") / url).resolve())
            remote = f"{name}: {redact_url(url)}"
    return md5, remote


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def lineage(params: Params) -> dict[str, str]:
    """The lineage tags every run carries (see the module docstring)."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain")
    md5, remote = data_version(params)
    tags = {
        "rlhf.git_commit": commit,
        "rlhf.git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "rlhf.data_md5": md5,
        "rlhf.dvc_remote": remote,
        "rlhf.params_hash": params_hash(params),
        "mlflow.source.git.commit": commit,
    }
    if "prefect" in sys.modules:  # only a Prefect flow has a flow run; importing it costs seconds
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["rlhf.prefect_flow_run_id"] = str(flow_run.id)
    return tags


# -- what dvc.yaml says about a stage ------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _dvc_stages(path: Path, mtime_ns: int) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ten times faster
    return (yaml.load(path.read_text(), Loader=loader) or {}).get("stages", {})


def dvc_stage(name: str) -> dict[str, Any]:
    """dvc.yaml's entry for a stage (parsed once per version of the file)."""
    path = Path("dvc.yaml").resolve()
    return _dvc_stages(path, path.stat().st_mtime_ns).get(name, {}) if path.exists() else {}


def stage_sections(name: str) -> list[str]:
    """The params sections a stage reads (its ``params`` in dvc.yaml)."""
    return [p for p in dvc_stage(name).get("params", []) if isinstance(p, str)]


def upstream_stages(name: str) -> list[str]:
    """The stages whose outputs ``name`` reads (its ``artifacts/<stage>/...`` deps in dvc.yaml)."""
    found = []
    for dep in dvc_stage(name).get("deps", []):
        parts = Path(dep).parts
        if len(parts) > 1 and parts[0] == ARTIFACTS.name and parts[1] not in found:
            found.append(parts[1])
    return found


def stage_inputs(name: str) -> list[str]:
    """The validated data files a stage reads (``artifacts/validate/data/<name>.jsonl`` deps)."""
    prefix = (ARTIFACTS / "validate" / "data").parts
    return [
        Path(dep).stem for dep in dvc_stage(name).get("deps", []) if Path(dep).parts[:3] == prefix
    ]


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


# -- runs --------------------------------------------------------------------------------------


def _start(run_name: str, tags: dict[str, str], parent_run_id: str | None) -> Any:
    import mlflow

    nested = mlflow.active_run() is not None
    if not nested and parent_run_id is None:
        end_orphaned_runs()
    return mlflow.start_run(
        run_name=run_name,
        nested=nested,
        parent_run_id=parent_run_id,
        tags={**tags, PROCESS_TAG: _this_process()},
    )


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

    if "id" not in _experiment:
        return []
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [_experiment["id"]],
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


def _log_inputs(name: str, params: Params) -> None:
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    md5, _ = data_version(params)
    datasets, contexts = [], []
    roles = stage_inputs(name)
    if name == "validate":  # the gate reads every data set
        roles = [role for role in type(params.data).model_fields if role != "dir"]
    for role in roles:
        original = getattr(params.data, role, None)  # the DVC-tracked file it was validated from
        source = LocalArtifactDatasetSource(str(Path(original or f"data/{role}").resolve()))
        datasets.append(MetaDataset(source, name=role, digest=md5[:36]))
        contexts.append("eval" if "heldout" in role else "train")
    for dataset, context in zip(datasets, contexts, strict=True):
        mlflow.log_input(dataset, context=context)


def _log_files(stage_dir: Path, since: float) -> None:
    """Log the small files the stage wrote during this run (not models, data or checkpoints)."""
    import mlflow

    if not stage_dir.is_dir() or (stage_dir / "config.json").exists():  # a model directory
        return
    for path in sorted(stage_dir.iterdir()):
        fresh = path.is_file() and path.stat().st_mtime >= since
        if fresh and path.suffix in _LOGGED_SUFFIXES:
            mlflow.log_artifact(str(path))


def log_model(stage: str, model_dir: Path, model_cfg: ModelConfig | None = None) -> str:
    """Log the model in ``model_dir`` to the active run with MLflow's transformers flavor; return
    the logged model's id (what ``promote`` registers).

    MLflow 3.17 can log a checkpoint directory without loading it, but that path breaks on
    transformers 5 (it expects the pipeline class where transformers now gives its name), so
    the model is loaded on the CPU and saved by the flavor: one more copy of the weights.
    """
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_tasks.training import load_tokenizer, model_kwargs

    auto = AutoModelForCausalLM if stage == "policy" else AutoModelForSequenceClassification
    load = model_kwargs(model_cfg)
    components = {
        "model": auto.from_pretrained(model_dir, **load),
        "tokenizer": load_tokenizer(str(model_dir), load["trust_remote_code"], f"{stage} model"),
    }
    info = mlflow.transformers.log_model(
        components,
        name=stage,
        task=MODEL_TASKS[stage],
        model_card=_model_card(stage, model_dir),  # given: MLflow then asks no hub for one
        pip_requirements=_requirements(),
    )
    return info.model_id


def load_logged_model(uri: str, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The components (``model``, ``tokenizer``) of a model logged by ``log_model``, at ``uri``
    (``models:/NAME/VERSION``), checked first as the preflight checks a model directory: a
    registry is shared, and MLflow's loader would run a model's own code and unpickle its
    weights without asking. A ConfigError unless ``model_cfg`` (params' ``model``) allows it."""
    import mlflow

    from rlhf_tasks.preflight import check_model_dir, remote_code

    model_cfg = model_cfg or ModelConfig()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))  # a local store: no copy
    check_model_dir(local / "model", uri, model_cfg)
    tokenizer_code = remote_code(local / "components" / "tokenizer")
    if tokenizer_code and not model_cfg.trust_remote_code:
        raise ConfigError(
            f"{uri}: its tokenizer ships its own code ({', '.join(tokenizer_code)}), which "
            "loading it would run; set model.trust_remote_code=true only if you trust its source"
        )
    return mlflow.transformers.load_model(str(local), return_type="components")


def _model_card(stage: str, model_dir: Path) -> Any:
    from huggingface_hub import ModelCard

    # The license is the base model's and the data's, which the pipeline cannot know.
    return ModelCard(
        "---\nlicense: unknown\nlibrary_name: transformers\n---\n"
        f"# {stage} model\n\nTrained by the `{stage}` stage of the RLHF pipeline from "
        f"`{model_dir}`. Its lineage (data md5, git commit, params) is on the MLflow run "
        "and on the registered model version's tags: `rlhf lineage NAME/VERSION`.\n"
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "accelerate")]


def record_run(stage: str, **record: Any) -> None:
    """Write ``artifacts/mlflow_runs/<stage>.json``; URLs in it without their credentials."""
    record = {k: redact_url(v) if isinstance(v, str) else v for k, v in record.items()}
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RUNS_DIR / f".{stage}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(RUNS_DIR / f"{stage}.json")


@contextlib.contextmanager
def stage_run(name: str, params: Params, parent_run_id: str | None = None) -> Iterator[dict]:
    """Track one stage: yields a dict the caller fills with the stage's result.

    On success the run gets the result's metrics, the stage's fresh files, its model (reward,
    policy) and ``artifacts/mlflow_runs/<name>.json``. On failure the run ends FAILED with the
    files the stage did write (a failed gate's report) and no model; the record keeps pointing
    at the last run that succeeded. A tracking server that does not answer fails the stage with
    a TrackingServerError (``server_errors``).
    """
    with server_errors(f"stage {name}"), _stage_run(name, params, parent_run_id) as result:
        yield result


@contextlib.contextmanager
def _stage_run(name: str, params: Params, parent_run_id: str | None) -> Iterator[dict]:
    import mlflow

    _tracked_removals.clear()
    configure(params)
    started = time.time()
    tags = {**lineage(params), "rlhf.stage": name}
    upstream = {}
    for stage in upstream_stages(name):
        record = recorded_run(stage)
        if record:
            upstream[stage] = record["run_id"]
            tags[f"rlhf.upstream.{stage}"] = record["run_id"]
    tags["rlhf.upstream_runs"] = json.dumps(upstream, sort_keys=True)
    stage_dir = ARTIFACTS / name
    result: dict[str, Any] = {}
    with _start(name, tags, parent_run_id) as run, server_errors(f"stage {name}"):
        dump = params.model_dump(mode="json", by_alias=True)
        mlflow.log_params(flatten({s: dump[s] for s in stage_sections(name) if s in dump}))
        _log_inputs(name, params)
        try:
            with server_errors(f"stage {name}"):  # before _log_files: it would wait again
                yield result
        finally:
            _log_files(stage_dir, started)
        mlflow.flush_async_logging()  # the trainers' per-step metrics, logged asynchronously
        stepped = set(mlflow.get_run(run.info.run_id).data.metrics)
        final = {  # a metric with a per-step history already ends with its final value
            k: float(v)
            for k, v in result.get("metrics", {}).items()
            if isinstance(v, int | float) and k not in stepped
        }
        mlflow.log_metrics(final)
        model_id = None
        if name in MODEL_TASKS and "model" in result.get("outputs", {}):
            model_dir = Path(result["outputs"]["model"])
            model_id = log_model(name, model_dir, params.model)
        record_run(
            name,
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            tracking_uri=tracking_uri(),
            model_id=model_id,
        )
    for path in _tracked_removals:  # the stage and its run are complete
        shutil.rmtree(path, ignore_errors=True)


_tracked_removals: list[Path] = []


def remove_when_tracked(path: Path) -> None:
    """Remove ``path`` (a stage's checkpoints) once the stage's MLflow run is complete, rather
    than now: if tracking fails, the rerun resumes from them instead of training again."""
    _tracked_removals.append(path)


def note_cached(stage: str) -> None:
    """On the active (pipeline) run: ``stage`` was not run, its outputs come from an earlier
    run (``rlhf.cached.<stage>`` = that run's id)."""
    import mlflow

    record = recorded_run(stage) or {}
    mlflow.set_tag(f"rlhf.cached.{stage}", record.get("run_id", "unknown"))


_progress: dict[str, Any] = {}  # stage -> (task run id, artifact id, last update time)
PROGRESS_EVERY_S = 10.0


def report_progress(stage: str, fraction: float) -> None:
    """A Prefect progress artifact for ``stage`` (0 to 100%), when it runs as a Prefect task.
    Updated at most every ``PROGRESS_EVERY_S`` seconds, and at 100%: each update is a call to
    the Prefect API, and the server's work competes with training for the CPU."""
    if "prefect" not in sys.modules:
        return
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return
    percent = round(100 * min(max(fraction, 0.0), 1.0), 1)
    run_key = f"{context.task_run.id}"
    now = time.monotonic()
    if _progress.get(stage, (None,))[0] != run_key:
        artifact = create_progress_artifact(
            progress=percent, key=f"{stage}-progress", description=f"{stage} training progress"
        )
        _progress[stage] = (run_key, artifact, now)
    elif percent >= 100 or now - _progress[stage][2] >= PROGRESS_EVERY_S:
        update_progress_artifact(_progress[stage][1], percent)
        _progress[stage] = (run_key, _progress[stage][1], now)
