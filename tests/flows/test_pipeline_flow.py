"""The Prefect flow runs the stages for real on Prefect's local test API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import FEW_STEPS
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import rlhf_pipeline
from rlhf_tasks.stages import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_every_stage_in_order(project: Path) -> None:
    state = rlhf_pipeline(params_path="params.yaml", overrides=FEW_STEPS, return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert list(results) == list(STAGES)
    assert (project / "artifacts/validate/report.json").exists()
    assert Path(results["validate"]["outputs"]["data"], "preferences_train.jsonl").exists()
    # reward (init_from: sft) could only start from the model that the sft task had just saved.
    assert results["sft"]["metrics"]["sft/steps"] == 2
    assert (project / results["reward"]["outputs"]["model"] / "config.json").exists()
    assert "reward_model/accuracy" in results["reward"]["metrics"]
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
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
        assert client.read_global_concurrency_limit_by_name("promotion").limit == 1


def test_failed_gate_fails_the_flow_and_writes_no_data(project: Path) -> None:
    train = project / "data/preferences/train.jsonl"
    train.write_text(train.read_text() + '{"prompt": "Tell me about dogs.", "chosen": \n')
    state = rlhf_pipeline(params_path="params.yaml", return_state=True)
    assert state.is_failed()
    assert "validation gate failed" in state.message or "validation gate failed" in str(
        state.result(raise_on_failure=False)
    )
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


def test_unchanged_stages_are_cached_across_runs(project: Path) -> None:
    """Same inputs: every stage but promote is Cached. Changed ppo params: policy and the
    stages after it run again. A deleted output: its stage runs again instead of crashing."""
    first = rlhf_pipeline(params_path="params.yaml", overrides=FEW_STEPS, return_state=True)
    assert first.is_completed(), first.message
    assert set(_task_states(first).values()) == {"Completed"}

    second = rlhf_pipeline(params_path="params.yaml", overrides=FEW_STEPS, return_state=True)
    assert second.is_completed(), second.message
    states = _task_states(second)
    assert states == {name: "Cached" for name in STAGES} | {"promote": "Completed"}, states
    assert second.result()["sft"] == first.result()["sft"]  # the previous result, reused
    # A cached policy is no new model: promote registers nothing, it says which version it is.
    assert second.result()["promote"]["metrics"]["promote/new_version"] == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert len(client.search_model_versions("name = 'rlhf-demo-policy'")) == 1

    changed = [*FEW_STEPS, "ppo.ppo_epochs=2"]
    third = rlhf_pipeline(params_path="params.yaml", overrides=changed, return_state=True)
    assert third.is_completed(), third.message
    states = _task_states(third)
    ran = {name for name, state in states.items() if state == "Completed"}
    assert ran == {"policy", "evaluate", "promote"}, states
    assert len(client.search_model_versions("name = 'rlhf-demo-policy'")) == 2

    shutil.rmtree(project / "artifacts/sft/model")  # an output the cache points at is gone
    fourth = rlhf_pipeline(params_path="params.yaml", overrides=changed, return_state=True)
    assert fourth.is_completed(), fourth.message
    states = _task_states(fourth)
    assert states["sft"] == "Completed" and (project / "artifacts/sft/model").exists()
    # SFT is deterministic: the same model again, so the reward model's inputs are unchanged.
    assert states["reward"] == "Cached", states
