"""The Prefect flow runs the stages for real on Prefect's local test API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import FEW_STEPS, hold_project, make_dvc_repo, set_params, shrink_data
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import rlhf_pipeline
from rlhf_tasks import lockfile, policy
from rlhf_tasks.config import load_params
from rlhf_tasks.dataversion import data_version
from rlhf_tasks.stages import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def dvc_project(project: Path) -> Path:
    """The ``project`` as a DVC repository with the stages' code (dvc.yaml's deps), its data
    and training shrunk (to a few steps, in params.yaml itself: what DVC records is
    params.yaml)."""
    make_dvc_repo(shrink_data(project))
    set_params(project, FEW_STEPS)
    return project


def _log_lines(state) -> list[str]:
    """The flow run's log lines in Prefect's API, after the queued ones have been sent."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    flow_run = LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=flow_run))]


def test_flow_runs_every_stage_in_order_and_dvc_records_it(
    dvc_project: Path, rlhf, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One flow run: every stage in order, each recorded in dvc.lock (dvc status is clean).
    Then what DVC finds unchanged is Cached: same inputs, every stage but promote; a changed
    ppo param, policy and the stages after it (tagged with the data version its gate read, though
    the data changes as it trains); a deleted output, its stage. A change to
    reward.py changes every stage whose code imports it. A check of a file leaves it all. SFT
    runs in two processes (`accelerate launch`): what they print reaches the Prefect log once."""
    project = dvc_project
    set_params(project, ["sft.resources.num_processes=2"])
    state = rlhf_pipeline(params_path="params.yaml", return_state=True)
    assert state.is_completed(), state.message
    assert set(_task_states(state).values()) == {"Completed"}
    results = state.result()
    assert list(results) == list(STAGES)
    assert (project / "artifacts/validate/report.json").exists()
    assert Path(results["validate"]["outputs"]["data"], "preferences_train.jsonl").exists()
    # reward (init_from: sft) could only start from the model that the sft task had just saved.
    assert results["sft"]["metrics"]["sft/steps"] == 2
    assert (project / results["reward"]["outputs"]["model"] / "config.json").exists()
    assert results["reward"]["metrics"]["reward_model/steps"] == 2
    # policy trained from that SFT model against that reward model; evaluate compared them.
    assert results["policy"]["metrics"]["policy/algorithm"] == "ppo"
    assert "gold/win_rate_vs_sft" in results["evaluate"]["metrics"]
    assert (project / "artifacts/evaluate/report.md").exists()
    # promote registered this run's models, and decided (two steps of training rarely win).
    assert results["promote"]["metrics"]["promote/policy_version"] == 1
    # Prefect artifacts: the evaluation report and PPO's progress; the concurrency limits.
    report = _artifacts(state, "evaluation-report")[-1].data
    assert "Champion vs challenger" in report and "rlhf-demo-policy version 1" in report
    assert "## Sample generations" in report and "## MLflow runs" in report
    assert _artifacts(state, "policy-progress")[-1].data == 100.0
    # What the stages printed is in the flow run's Prefect log (a worker's stdout is read by
    # nobody): the gate's verdict, the rows a trainer kept, the promotion decision.
    logged = _log_lines(state)
    assert any(line.startswith("Validation gate PASSED") for line in logged), logged
    sft_rows = [line for line in logged if line.startswith("sft: trains on")]
    assert len(sft_rows) == 1 and sft_rows[0].startswith("sft: trains on 160 of 160 rows"), logged
    assert any(line.startswith("rlhf-demo-policy version 1:") for line in logged), logged
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
        assert client.read_global_concurrency_limit_by_name("promotion").limit == 1
    # DVC recorded every stage: nothing to reproduce, the models are in its cache.
    assert lockfile.status() == {}
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert list(lock) == list(STAGES)
    assert not (project / "artifacts/sft/checkpoints").exists()  # removed once tracked

    second = rlhf_pipeline(params_path="params.yaml", return_state=True)
    assert second.is_completed(), second.message
    states = _task_states(second)
    assert states == {name: "Cached" for name in STAGES} | {"promote": "Completed"}, states
    # The outputs on disk and the metrics their run wrote.
    assert second.result()["reward"]["metrics"] == json.loads(
        (project / "artifacts/reward/metrics.json").read_text()
    )
    # A cached policy is no new model: promote registers nothing, it says which version it is.
    assert second.result()["promote"]["metrics"]["promote/new_version"] == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert len(client.search_model_versions("name = 'rlhf-demo-policy'")) == 1

    # One data version per run: data that changes while a run trains (an ingest, a `git pull`)
    # is the next run's. This run's stages and its models name the version its gate read.
    pinned = json.loads((project / "artifacts/validate/data/version.json").read_text())["md5"]
    train = project / "data/preferences/train.jsonl"
    original = train.read_text()

    def policy_while_the_data_changes(params, io):
        train.write_text(original + original.splitlines()[0] + "\n")
        return real_policy(params, io)

    real_policy = policy.run
    monkeypatch.setattr(policy, "run", policy_while_the_data_changes)
    set_params(project, ["ppo.ppo_epochs=2"])
    third = rlhf_pipeline(params_path="params.yaml", return_state=True)
    assert third.is_completed(), third.message
    ran = {name for name, state in _task_states(third).items() if state == "Completed"}
    assert ran == {"policy", "evaluate", "promote"}, _task_states(third)
    monkeypatch.setattr(policy, "run", real_policy)
    assert data_version(load_params("params.yaml")).md5 != pinned  # the data did change
    flow_run = third.state_details.flow_run_id
    tagged = {
        r.info.run_name: r.data.tags["rlhf.data_md5"]
        for r in client.search_runs(
            [client.get_experiment_by_name("rlhf").experiment_id],
            f"tags.`rlhf.prefect_flow_run_id` = '{flow_run}'",
        )
    }
    assert tagged == dict.fromkeys(["rlhf_pipeline", "policy", "evaluate", "promote"], pinned)
    versions = client.search_model_versions("name = 'rlhf-demo-policy'")
    assert len(versions) == 2
    assert {v.tags["rlhf.data_md5"] for v in versions} == {pinned}
    train.write_text(original)
    assert lockfile.status() == {}

    shutil.rmtree(project / "artifacts/sft/model")  # an output DVC recorded is gone
    fourth = rlhf_pipeline(params_path="params.yaml", return_state=True)
    assert fourth.is_completed(), fourth.message
    states = _task_states(fourth)
    assert states["sft"] == "Completed" and (project / "artifacts/sft/model").exists()
    # SFT is deterministic: the same model again, so the reward model's inputs are unchanged.
    assert states["reward"] == "Cached", states

    # An ad-hoc check of a file writes its own report, never the validate stage's outputs.
    validated = sorted(p.name for p in (project / "artifacts/validate/data").iterdir())
    code, out, _ = rlhf("validate", "data/sft/train.jsonl")
    assert code == 0, out
    assert (project / "artifacts/checks/validate/report.json").exists()
    assert sorted(p.name for p in (project / "artifacts/validate/data").iterdir()) == validated
    assert lockfile.status() == {}

    # The code a stage imports is its dep: reward.py is read by reward, judge, policy (PPO's
    # scorer format), evaluate and promote.
    reward_py = project / "rlhf_tasks/reward.py"
    reward_py.write_text(reward_py.read_text() + "\n# changed\n")
    assert set(lockfile.status()) == {"reward", "judge", "policy", "evaluate", "promote"}


def test_failed_gate_fails_the_flow_and_writes_no_data(project: Path) -> None:
    train = project / "data/preferences/train.jsonl"
    train.write_text(train.read_text() + '{"prompt": "Tell me about dogs.", "chosen": \n')
    state = rlhf_pipeline(params_path="params.yaml", return_state=True)
    assert state.is_failed()
    assert state.message.startswith("ValidationFailed: validation gate failed"), state.message
    report = _artifacts(state, "validation-report")[-1].data
    assert "| preferences_train | parseable |" in report and "train.jsonl:" in report
    assert (project / "artifacts/validate/report.json").exists()
    assert not (project / "artifacts/validate/data").exists()


def test_rlhf_run_stops_at_the_gate_with_exit_code_1(project: Path, rlhf) -> None:
    """`rlhf run` is the flow from the command line: a failed gate is a data error (exit 1) that
    names the file and row, not a traceback; no later stage ran."""
    train = project / "data/preferences/train.jsonl"
    n_rows = len(train.read_text().splitlines())
    train.write_text(train.read_text() + '{"prompt": "Tell me about dogs.", "chosen": \n')
    code, out, err = rlhf("run")
    assert code == 1, (out, err)
    assert "validation gate failed (preferences_train/parseable)" in err
    assert "Traceback" not in err
    # The summary with file:row goes to Prefect's log; the report has it too.
    report = json.loads((project / "artifacts/validate/report.json").read_text())
    (failed,) = [
        c
        for c in report["checks"]
        if c["dataset"] == "preferences_train" and c["check"] == "parseable"
    ]
    assert "train.jsonl" in json.dumps(failed) and str(n_rows + 1) in json.dumps(failed), failed
    assert not (project / "artifacts/sft").exists()
    # MLflow: the validate run failed with its report; the pipeline's run failed; no model.
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
    }
    assert set(runs) == {"rlhf_pipeline", "base_model", "validate"}
    assert runs["validate"].info.status == runs["rlhf_pipeline"].info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(runs["validate"].info.run_id)] == ["report.json"]
    assert client.search_registered_models() == []


def _artifacts(flow_state, key: str) -> list:
    """The artifacts with ``key`` that the flow run of ``flow_state`` created."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_state.state_details.flow_run_id])
            )
        )
    return sorted((a for a in found if a.key == key), key=lambda a: a.created)


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name: run.state.name for run in runs}


def test_a_flow_run_waits_for_the_project_and_gives_up_after_its_limit(project: Path) -> None:
    """A flow run that a worker starts while `rlhf run` (or another run) holds the project waits
    for it, saying so in Prefect's log, and fails with one message after
    orchestration.slot_timeout_s (tests/reliability/test_concurrency.py: the wait that ends)."""
    holder = hold_project()
    try:
        state = rlhf_pipeline(
            params_path="params.yaml",
            overrides=["orchestration.slot_timeout_s=1"],
            return_state=True,
        )
    finally:
        holder.kill()
        holder.wait()
    assert state.is_failed()
    assert state.message.startswith("BusyError: waited 1 s"), state.message
    assert f"`rlhf run` (pid {holder.pid}" in state.message
    assert any(line.startswith("waiting for `rlhf run`") for line in _log_lines(state))
    assert not Path("artifacts/validate").exists()  # nothing ran
