"""Team scale, as users deploy it, every component real and on 127.0.0.1: a Prefect server on
PostgreSQL, an MLflow server with a PostgreSQL backend store and a local artifact root, a `gpu`
work pool of process type with a worker, `prefect deploy --all` from prefect.yaml (with a tiny
config), a triggered `rlhf-retrain` run with an `rlhf-ingest` run during it, the champion
alias in that MLflow registry, and a retrain cancelled from Prefect that the next one resumes.

Skipped, saying so, where no PostgreSQL answers on 127.0.0.1:5432 (a laptop); CI always has one.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import BIN, FEW_STEPS, PG, env, fresh_clone, pg_databases, set_params, shrink_data
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

TINY = [
    *FEW_STEPS,
    # Two steps of training: what is under test is the deployment, not the model's quality.
    "promote.min_win_rate=0",
    "promote.min_reward_model_accuracy=0",
    "promote.required_checks=[]",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, f"{url} did not answer\n{log.read_text()[-5000:]}"
            time.sleep(1)


@pytest.fixture
def team(tmp_path: Path):
    """PostgreSQL databases, a Prefect server and an MLflow server; all removed at the end."""
    with pg_databases("prefect", "mlflow") as dbs:
        yield from _servers(tmp_path, dbs)


def _servers(tmp_path: Path, dbs: dict[str, str]):
    procs: list[subprocess.Popen] = []
    base = env()
    prefect_port, mlflow_port = _free_port(), _free_port()
    urls = {
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
    }
    try:
        prefect_log = tmp_path / "prefect-server.log"
        prefect_env = {
            **base,
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
                f"postgresql+asyncpg://{PG['user']}@{PG['host']}:{PG['port']}/{dbs['prefect']}"
            ),
        }
        procs.append(
            subprocess.Popen(
                [
                    BIN / "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(prefect_port),
                ],
                env=prefect_env,
                stdout=prefect_log.open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        mlflow_log = tmp_path / "mlflow-server.log"
        procs.append(
            subprocess.Popen(
                [
                    BIN / "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--backend-store-uri",
                    f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{dbs['mlflow']}",
                    "--artifacts-destination",
                    str(tmp_path / "mlflow-artifacts"),
                    "--workers",
                    "1",
                ],
                env=base,
                stdout=mlflow_log.open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        _wait_http(f"{urls['PREFECT_API_URL']}/health", procs[0], prefect_log)
        _wait_http(f"{urls['MLFLOW_TRACKING_URI']}/health", procs[1], mlflow_log)
        yield {"urls": urls, "procs": procs, "home": prefect_env["PREFECT_HOME"]}
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _prefect(team: dict, read):
    """``read(client)`` with a client of the team's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: team["urls"]["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        return read(client)


def _run_log(team: dict, flow_run_id: str) -> list:
    """The Prefect log of a flow run: what `prefect flow-run logs` shows."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    of_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    return _prefect(team, lambda client: client.read_logs(of_run))


def _wait(what: str, done, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what}\n--- worker\n{log.read_text()[-8000:]}"
        time.sleep(1)


def _md5(clone: Path) -> str:
    return yaml.safe_load((clone / "data.dvc").read_text())["outs"][0]["md5"]


def test_deployed_retraining_on_a_gpu_pool_promotes_a_champion(team, tmp_path: Path) -> None:
    """The README's team block: a retrain deployment run promotes a champion. An ingest
    deployment run started while it trains, by a worker that takes two runs at once, waits for
    the project (it says so in its Prefect log), lands a new data version, and queues the next
    retrain, which trains on it: every MLflow run of each retrain, and its model version, names
    the data version that retrain read, and its gate counted that version's rows. A retrain
    cancelled (`prefect flow-run cancel`) while PPO trains is stopped by the worker and keeps
    its last PPO checkpoint; the next retrain resumes from it and completes."""
    clone = fresh_clone(tmp_path / "project")
    deploy = yaml.safe_load((clone / "prefect.yaml").read_text())
    (retrain,) = [d for d in deploy["deployments"] if d["name"] == "rlhf-retrain"]
    retrain["parameters"]["overrides"] = TINY
    (clone / "prefect.yaml").write_text(yaml.safe_dump(deploy, sort_keys=False))
    run_env = {**env(clone), **team["urls"], "PREFECT_HOME": team["home"], "PWD": str(clone)}

    def cli(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=clone,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if check:
            assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc

    def start(deployment: str, *args: str) -> str:
        out = cli(BIN / "prefect", "deployment", "run", deployment, *args).stdout
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    cli(BIN / "rlhf", "data", "demo", "--check")
    shrink_data(clone)  # a deployment under test, not the data: fewer rows to read and score
    # The tiny config in params.yaml too, so that DVC records (and later skips) the stages of
    # runs whose overrides are these same values.
    set_params(clone, TINY)
    cli(BIN / "prefect", "work-pool", "create", "gpu", "--type", "process")
    cli(BIN / "prefect", "--no-prompt", "deploy", "--all")
    # As the README says for a trial: no scheduled retrains (this removes the queued ones).
    cli(BIN / "prefect", "--no-prompt", "deployment", "schedule", "pause", "--all")
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Tell me about dogs at the beach, part {i}.",
                    "chosen": "Dogs love to run on the sand. Most dogs enjoy a swim.",
                    "rejected": "I do not know.",
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(  # two runs at once: only the project lock keeps them apart
        [BIN / "prefect", "worker", "start", "--pool", "gpu", "--limit", "2"],
        cwd=clone,
        # It looks for runs to start every 2 s instead of 10: seconds of the test, not waited
        # out six times.
        env={**run_env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        stdout=worker_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    pinned = clone / "artifacts/validate/data/version.json"
    try:
        first = start("rlhf_pipeline/rlhf-retrain")
        _wait("the retrain's gate", pinned.exists, worker_log)  # it holds the project now
        version_a = json.loads(pinned.read_text())["md5"]
        ingest = start(
            "rlhf_ingest/rlhf-ingest",
            "--params",
            json.dumps({"batch": str(batch), "retrain": True, "overrides": TINY}),
        )

        def flow_run(flow_run_id: str):
            return _prefect(team, lambda client: client.read_flow_run(flow_run_id))

        def retrains() -> list[str]:
            deployment = flow_run(first).deployment_id
            found = _prefect(team, lambda client: client.read_flow_runs())
            return [str(r.id) for r in found if r.deployment_id == deployment]

        for flow_run_id in (first, ingest):
            _wait(flow_run_id, lambda i=flow_run_id: flow_run(i).state.is_final(), worker_log)
        _wait("the retrain the ingest queued", lambda: len(retrains()) == 2, worker_log)
        (second,) = set(retrains()) - {first}
        _wait(second, lambda: flow_run(second).state.is_final(), worker_log)
        states = {i: flow_run(i).state for i in (first, ingest, second)}
        assert all(state.is_completed() for state in states.values()), (
            f"{states}\n--- worker\n{worker_log.read_text()[-8000:]}"
        )

        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
        )

        # The runs did not collide: the ingest changed the data only after the retrain had
        # ended, and if it started while the retrain ran, it said that it waited. (How soon a
        # worker starts a run varies: on a loaded machine the retrain may be over by then.)
        retrain_end = _prefect(team, lambda c: c.read_flow_run(first)).end_time
        ingest_start = _prefect(team, lambda c: c.read_flow_run(ingest)).start_time
        of_ingest = FlowRunFilter(id=FlowRunFilterId(any_=[ingest]))
        task_runs = _prefect(team, lambda c: c.read_task_runs(flow_run_filter=of_ingest))
        (merge,) = [t for t in task_runs if t.name.startswith("merge_and_version")]
        assert merge.start_time > retrain_end, (merge.start_time, retrain_end)
        if ingest_start < retrain_end:
            logged = _run_log(team, ingest)
            assert any(log.message.startswith("waiting for") for log in logged), logged
        # The first retrain's Prefect log (a worker's stdout is read by nobody) holds what its
        # stages told the user: the gate's verdict and the promotion decision.
        told = [log.message for log in _run_log(team, first)]
        assert any(m.startswith("Validation gate PASSED") for m in told), told
        assert any(m.startswith("rlhf-demo-policy version 1: champion") for m in told), told
        version_b = _md5(clone)  # what the ingest committed
        assert version_b != version_a

        client = MlflowClient(tracking_uri=team["urls"]["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("rlhf").experiment_id
        for flow_run_id, version, rows in ((first, version_a, 160), (second, version_b, 165)):
            runs = client.search_runs(
                [experiment], f"tags.`rlhf.prefect_flow_run_id` = '{flow_run_id}'"
            )
            by_name = {r.info.run_name: r for r in runs}
            # (sft is the first retrain's only: the ingest added preference pairs, no SFT data)
            assert {"rlhf_pipeline", "validate", "reward", "policy", "promote"} <= set(by_name)
            assert {r.data.tags["rlhf.data_md5"] for r in runs} == {version}, flow_run_id
            validated = by_name["validate"].data.metrics["validate/preferences_train/rows"]
            assert validated == rows
        versions = {
            str(v.version): v for v in client.search_model_versions("name = 'rlhf-demo-policy'")
        }
        assert set(versions) == {"1", "2"}, versions
        assert versions["1"].tags["rlhf.data_md5"] == version_a
        assert versions["2"].tags["rlhf.data_md5"] == version_b
        assert versions["1"].tags["rlhf.promotion"] == "champion", versions["1"].tags
        champion = client.get_model_version_by_alias("rlhf-demo-policy", "champion")
        assert champion.tags["rlhf.promotion"] == "champion"
        assert not (clone / "mlflow.db").exists()  # everything went to the team's server

        # Cancelled from Prefect while PPO trains: the worker stops the run, its last PPO
        # checkpoint stays, and the next run resumes from it and completes. The settings are
        # params.yaml's, as in production: DVC skips the stages before PPO in both runs (with
        # overrides that differ from params.yaml, DVC records no stage, each run trains SFT
        # and the reward model anew, and PPO, whose inputs are new, starts anew). PPO is
        # longer, so that it is still training when the cancellation lands.
        set_params(clone, ["ppo.total_episodes=1600", "ppo.save_every=4"])
        longer = json.dumps({"overrides": []})
        cancelled = start("rlhf_pipeline/rlhf-retrain", "--params", longer)
        checkpoints = clone / "artifacts/policy/checkpoints"
        _wait(
            "a PPO checkpoint",
            lambda: any(checkpoints.glob("update-*/history.json")),
            worker_log,
        )
        cli(BIN / "prefect", "flow-run", "cancel", cancelled)
        _wait("the cancellation", lambda: flow_run(cancelled).state.is_final(), worker_log)
        assert flow_run(cancelled).state.is_cancelled(), flow_run(cancelled).state
        kept = [d.parent.name for d in checkpoints.glob("update-*/history.json")]
        assert kept, "the cancelled run left no PPO checkpoint"
        resumed = start("rlhf_pipeline/rlhf-retrain", "--params", longer)
        _wait(resumed, lambda: flow_run(resumed).state.is_final(), worker_log)
        assert flow_run(resumed).state.is_completed(), worker_log.read_text()[-8000:]
        logged = _run_log(team, resumed)
        resumed_from = [log.message for log in logged if log.message.startswith("resuming from")]
        assert resumed_from and any(
            f"artifacts/policy/checkpoints/{name}" in resumed_from[0] for name in kept
        ), (resumed_from, kept)

        # A bad batch through the ingest deployment: the run fails, and its Prefect log (what
        # `prefect flow-run logs` and the UI show) names the check, the file and the row, once,
        # with no traceback (not even the one Prefect's engine logs for a deployment's failed
        # run: flows/logs.py filters it out for a user's mistake).
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "Hi there.", "chosen": "Same.", "rejected": "Same."}))
        refused = start("rlhf_ingest/rlhf-ingest", "--params", json.dumps({"batch": str(bad)}))
        _wait(refused, lambda: flow_run(refused).state.is_final(), worker_log)
        assert flow_run(refused).state.is_failed(), flow_run(refused).state

        # (the run's last logs reach the API in its log handler's last batch, after its state)
        _wait(
            "the refused batch's log",
            lambda: any("Finished in state" in log.message for log in _run_log(team, refused)),
            worker_log,
        )
        logged = _run_log(team, refused)
        text = "\n".join(log.message for log in logged)
        assert "chosen_differs" in text and "bad.jsonl:1" in text, text
        assert "Traceback" not in text and "unexpected exception" not in text, text
        assert text.count("chosen_differs: ") == 1, text
    finally:
        # Prefect 3's process worker does not stop on SIGTERM (nor SIGINT) while idle: it
        # forwards SIGINT to itself, asyncio cancels the main task, and the worker waits on (the
        # main thread in select, measured with faulthandler; still up after 60 s). Its runs are
        # over here, so it is given a few seconds and then killed.
        worker.terminate()
        try:
            worker.wait(timeout=3)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
