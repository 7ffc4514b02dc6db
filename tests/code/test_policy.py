"""Stage policy: each algorithm (our PPO, TRL's RLOO, GRPO and DPO) for a few steps on the demo
data, from a tiny SFT model and reward model; outputs, metrics and the choice of algorithm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_tasks.config import load_params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import call

TRL_TINY = [
    "max_steps=2",
    "per_device_train_batch_size=4",
    "logging_steps=1",
    "save_steps=1",
    "disable_tqdm=true",
]
TINY = {
    "ppo": [
        "ppo.total_episodes=16",
        "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
        "ppo.response_length=8",
    ],
    "rloo": [f"rloo.args.{a}" for a in TRL_TINY]
    + ["rloo.args.num_generations=2", "rloo.args.max_completion_length=8"],
    "grpo": [f"grpo.args.{a}" for a in TRL_TINY]
    + ["grpo.args.num_generations=2", "grpo.args.max_completion_length=8"],
    "dpo": [f"dpo.args.{a}" for a in TRL_TINY],
}


@pytest.fixture
def upstream(project: Path, validated, base_model_dir: Path) -> Path:
    """The validated data, and the base model standing in for both the SFT model and the reward
    model (with a fresh score head) where the policy stage looks for them."""
    validated(sft=8, pairs=16, heldout=8, prompts=16)
    shutil.copytree(base_model_dir, project / "artifacts/sft/model")
    rm = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(base_model_dir).pad_token_id
    rm.save_pretrained(project / "artifacts/reward/model")
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(
        project / "artifacts/reward/model"
    )
    return project


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo", "dpo"])
def test_each_algorithm_trains_the_sft_model_into_a_policy(upstream: Path, algorithm: str):
    params = load_params("params.yaml", [f"policy.algorithm={algorithm}", *TINY[algorithm]])
    result = call("policy", params)

    model_dir = upstream / result["outputs"]["model"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2
    assert not (model_dir / "adapter_config.json").exists()
    start = load_file(str(upstream / "artifacts/sft/model/model.safetensors"))
    end = load_file(str(model_dir / "model.safetensors"))
    assert any(not (start[k] == end[k]).all() for k in start if k in end), "nothing trained"

    run = json.loads((upstream / "artifacts/policy/run.json").read_text())
    assert run["policy/algorithm"] == algorithm
    metrics = json.loads((upstream / "artifacts/policy/metrics.json").read_text())
    history = [json.loads(line) for line in (upstream / "artifacts/policy/history.jsonl").open()]
    assert len(history) == 2 and history[-1]["episode"] > history[0]["episode"]
    # The final metrics are the last update's row of the history, under the same names (not
    # the update, episode or learning-rate bookkeeping).
    last = {k: v for k, v in history[-1].items() if "/" in k}
    rows = {k: metrics.pop(k) for k in list(metrics) if "/rows_" in k or "/prompts_" in k}
    assert last and metrics == pytest.approx(last, abs=1e-6, nan_ok=True)
    # And what the stage did with its rows: 16 prompts (DPO: 16 pairs), none lost.
    assert rows["policy/rows_read"] == rows["policy/rows_kept"] == 16
    assert rows["policy/rows_dropped"] == rows["policy/rows_truncated"] == 0
    if algorithm != "dpo":  # the online algorithms log the reward model's score like PPO does
        assert "objective/scores" in metrics


def test_policy_stage_needs_the_reward_model(project: Path, validated, base_model_dir: Path):
    validated(prompts=8)
    shutil.copytree(base_model_dir, project / "artifacts/sft/model")
    with pytest.raises(ConfigError, match="needs the reward model in artifacts/reward/model"):
        call("policy", load_params("params.yaml"))


@pytest.mark.slow
def test_unknown_trl_argument_is_a_config_error(upstream: Path):
    params = load_params("params.yaml", ["policy.algorithm=grpo", "grpo.args.num_generation=2"])
    with pytest.raises(ConfigError, match=r"grpo\.args\.num_generation: .*'num_generations'"):
        call("policy", params)
