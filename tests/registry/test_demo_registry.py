"""The demo as `make demo` leaves it on a fresh clone: MLflow runs, lineage, the champion; and a
second run made worse on purpose, which must not take the champion alias."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import BIN, sh
from mlflow import MlflowClient

from rlhf_tasks.stages import STAGES

pytestmark = pytest.mark.slow
POLICY = "rlhf-demo-policy"


def _client(clone: Path) -> MlflowClient:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")


def test_demo_records_a_parent_run_with_a_nested_run_per_stage(demo_run) -> None:
    client = _client(demo_run.clone)
    experiment = client.get_experiment_by_name("rlhf")
    ids = [experiment.experiment_id]
    (parent,) = client.search_runs(ids, "attributes.run_name = 'rlhf_pipeline'")
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    runs = {r.info.run_name: r for r in children}
    commit = sh("git", "rev-parse", "HEAD", cwd=demo_run.clone).stdout.strip()
    md5 = yaml.safe_load((demo_run.clone / "data.dvc").read_text())["outs"][0]["md5"]
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags["rlhf.git_commit"] == commit and tags["rlhf.data_md5"] == md5
        assert tags["rlhf.git_dirty"] == "false", run.info.run_name
        assert tags["rlhf.prefect_flow_run_id"] and tags["rlhf.params_hash"]
        assert run.info.status == "FINISHED"
    # Upstream runs, params of the stage's sections, datasets with the DVC md5 as digest.
    assert runs["policy"].data.tags["rlhf.upstream.sft"] == runs["sft"].info.run_id
    assert runs["policy"].data.params["ppo.kl_coef"] == "0.1"
    inputs = {d.dataset.name: d for d in runs["reward"].inputs.dataset_inputs}
    assert inputs["preferences_train"].dataset.digest == md5[:36]
    context = {t.key: t.value for t in inputs["preferences_heldout"].tags}
    assert context["mlflow.data.context"] == "eval"
    # Per-step metrics: TRL's SFT loss by global step; PPO's score by update.
    sft_loss = client.get_metric_history(runs["sft"].info.run_id, "loss")
    assert len(sft_loss) > 3 and sft_loss[-1].step > sft_loss[0].step
    scores = client.get_metric_history(runs["policy"].info.run_id, "objective/scores")
    assert [m.step for m in scores] == list(range(1, len(scores) + 1))
    logged = {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id)}
    assert {"metrics.json", "report.md", "reward_kl.png", "reward_model_scores.png"} <= logged
    assert "report.json" in {a.path for a in client.list_artifacts(runs["validate"].info.run_id)}


def test_demo_champion_and_its_lineage(demo_run) -> None:
    client = _client(demo_run.clone)
    champion = client.get_model_version_by_alias(POLICY, "champion")
    assert champion.tags["rlhf.promotion"] == "champion"
    assert champion.tags["rlhf.baseline"] == "sft"
    assert float(champion.tags["judge/win_rate_vs_sft"]) >= 0.55
    assert (
        champion.run_id
        == json.loads((demo_run.clone / "artifacts/mlflow_runs/policy.json").read_text())["run_id"]
    )  # the version is the model the policy stage's run logged
    out = sh(BIN / "rlhf", "lineage", f"{POLICY}@champion", cwd=demo_run.clone).stdout
    md5 = yaml.safe_load((demo_run.clone / "data.dvc").read_text())["outs"][0]["md5"]
    assert md5 in out
    assert sh("git", "rev-parse", "HEAD", cwd=demo_run.clone).stdout.strip() in out
    assert "ppo.learning_rate = 0.0001" in out
    assert "dpo." not in out and "grpo." not in out  # the algorithm that trained it, only
    assert f"{POLICY} version 1: champion" in demo_run.stdout
