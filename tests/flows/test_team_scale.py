"""Team scale, as users deploy it, every component real and on 127.0.0.1: a Prefect server on
PostgreSQL, an MLflow server with a PostgreSQL backend store and a local artifact root, a `gpu`
work pool of process type with a worker, `prefect deploy --all` from prefect.yaml (with a tiny
config), a triggered `rlhf-retrain` run, and the champion alias in that MLflow registry.

Skipped, saying so, where no PostgreSQL answers on 127.0.0.1:5432 (a laptop); CI always has one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from helpers import BIN, FEW_STEPS, env, fresh_clone, shrink_data
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

PG = {"host": "127.0.0.1", "port": 5432, "user": os.environ.get("RLHF_TEST_PGUSER", "postgres")}
TINY = [
    *FEW_STEPS,
    # Two steps of training: what is under test is the deployment, not the model's quality.
    "promote.min_win_rate=0",
    "promote.min_reward_model_accuracy=0",
    "promote.required_checks=[]",
]


def _postgres_up() -> bool:
    try:
        with socket.create_connection((PG["host"], PG["port"]), timeout=2):
            return True
    except OSError:
        return False


def _admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", **PG)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


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
    if not _postgres_up():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432: the team-scale test needs one")
    suffix = uuid.uuid4().hex[:10]
    dbs = {"prefect": f"rlhf_prefect_{suffix}", "mlflow": f"rlhf_mlflow_{suffix}"}
    for db in dbs.values():
        _admin(f"CREATE DATABASE {db}")
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
        for db in dbs.values():
            _admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_deployed_retraining_on_a_gpu_pool_promotes_a_champion(team, tmp_path: Path) -> None:
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

    cli(BIN / "rlhf", "data", "demo", "--check")
    shrink_data(clone)  # a deployment under test, not the data: fewer rows to read and score
    cli(BIN / "prefect", "work-pool", "create", "gpu", "--type", "process")
    cli(BIN / "prefect", "--no-prompt", "deploy", "--all")
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [BIN / "prefect", "worker", "start", "--pool", "gpu", "--limit", "1"],
        cwd=clone,
        env=run_env,
        stdout=worker_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        run = cli(
            BIN / "prefect",
            "deployment",
            "run",
            "rlhf_pipeline/rlhf-retrain",
            "--watch",
            "--watch-timeout",
            "900",
            check=False,
        )
        assert run.returncode == 0, (
            f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}\n"
            f"--- worker\n{worker_log.read_text()[-8000:]}"
        )
        assert "Completed" in run.stdout + run.stderr
    finally:
        # Prefect 3's process worker does not stop on SIGTERM (nor SIGINT) while idle: it
        # forwards SIGINT to itself, asyncio cancels the main task, and the worker waits on (the
        # main thread in select, measured with faulthandler; still up after 60 s). Its run is
        # over here, so it is given a few seconds and then killed.
        worker.terminate()
        try:
            worker.wait(timeout=3)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    client = MlflowClient(tracking_uri=team["urls"]["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name = 'rlhf-demo-policy'")
    assert [str(v.version) for v in versions] == ["1"], versions
    assert versions[0].tags["rlhf.promotion"] == "champion", versions[0].tags
    champion = client.get_model_version_by_alias("rlhf-demo-policy", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["rlhf.promotion"] == "champion"
    runs = client.search_runs(
        [client.get_experiment_by_name("rlhf").experiment_id], "attributes.run_name = 'sft'"
    )
    assert runs and runs[0].data.tags["rlhf.prefect_flow_run_id"]
    assert not (clone / "mlflow.db").exists()  # everything went to the team's server
