"""Multi-process stages: ``resources.num_processes: 2`` runs SFT and PPO under
``accelerate launch`` as two gloo processes on the CPU, tracked as one MLflow run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from rlhf_tasks import launch
from rlhf_tasks.config import load_params
from rlhf_tasks.runner import run_stage
from rlhf_tasks.stages import STAGES
from rlhf_tasks.tracking import store

pytestmark = pytest.mark.slow


def test_num_processes_comes_from_the_stage_section(project: Path) -> None:
    params = load_params(
        "params.yaml",
        [
            "sft.resources.num_processes=2",
            "policy.algorithm=grpo",
            "grpo.resources.num_processes=3",
        ],
    )
    sections = {
        name: stage.trainer_section(params) if stage.trainer_section else None
        for name, stage in STAGES.items()
    }
    assert sections["policy"] == params.policy.algorithm  # the configured algorithm's section
    processes = {name: launch.num_processes(s, params) for name, s in sections.items()}
    assert (processes["sft"], processes["reward"], processes["policy"]) == (2, 1, 3)
    assert processes["evaluate"] == 1


def test_sft_and_ppo_in_two_processes(project: Path, validated, base_model_dir: Path) -> None:
    validated(sft=64, prompts=16)
    params = load_params(
        "params.yaml",
        [
            "sft.resources.num_processes=2",
            "sft.args.max_steps=2",
            "sft.args.per_device_train_batch_size=4",
            "ppo.resources.num_processes=2",
            "ppo.total_episodes=16",
            "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=4",
            "ppo.micro_batch_size=1",  # accumulation under DDP: gradients synchronised once
            "ppo.ppo_epochs=1",
            "ppo.response_length=8",
        ],
    )
    sft = run_stage("sft", params)
    assert sft["metrics"]["sft/num_processes"] == 2 and sft["metrics"]["sft/steps"] == 2
    assert (project / "artifacts/sft/model/model.safetensors").exists()
    # PPO needs a reward model: the base model with a fresh score head stands in for one.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_dir = project / "artifacts/reward/model"
    AutoModelForSequenceClassification.from_pretrained(
        base_model_dir, num_labels=1
    ).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(reward_dir)
    policy = run_stage("policy", params)
    assert policy["metrics"]["policy/num_processes"] == 2
    history = (project / "artifacts/policy/history.jsonl").read_text().splitlines()
    assert [json.loads(row)["update"] for row in history] == [1, 2]
    assert (
        json.loads((project / "artifacts/policy/run.json").read_text())["policy/num_processes"] == 2
    )
    # One MLflow run per stage, from the main process only.
    client = MlflowClient(tracking_uri=store.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["policy", "sft"]
    assert all(r.info.status == "FINISHED" for r in runs)
    shutil.rmtree(project / "artifacts/cache", ignore_errors=True)
