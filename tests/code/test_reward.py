"""Stage reward on a few demo pairs: outputs, the pairs' text, scoring, LoRA, resume. (That the
reward model learns the demo's preferences: tests/model/test_demo_quality.py, on the demo run's.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_validated
from transformers import AutoModelForSequenceClassification
from trl import RewardTrainer

from rlhf_tasks import reward
from rlhf_tasks.config import load_params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import STAGES, call
from rlhf_tasks.training import save_plain_model

# Where the stage reads its held-out pairs (relative to the project directory).
HELDOUT = STAGES["reward"].io().inputs["preferences_heldout"]

# From the random-init base model (no SFT run needed), a few steps of batch 8.
TINY = [
    "reward.init_from=base",
    "reward.args.max_steps=4",
    "reward.args.per_device_train_batch_size=8",
    "reward.args.logging_steps=1",
    "reward.args.save_steps=2",
    "reward.args.disable_tqdm=true",
]


def _params(*overrides: str):
    return load_params("params.yaml", [*TINY, *overrides])


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.fixture(scope="module")
def resumed(module_project) -> tuple[Path, dict]:
    """One run of ``TINY`` on 64 pairs (32 held out), killed after its first checkpoint (step
    2) and run again to the end: the project directory and the second run's result."""
    with module_project("reward") as root:
        write_validated(root, pairs=64, heldout=32)
        save = RewardTrainer._save_checkpoint

        def save_then_die(self, model, trial):
            save(self, model, trial)
            raise Killed

        with pytest.MonkeyPatch.context() as m:
            m.setattr(RewardTrainer, "_save_checkpoint", save_then_die)
            with pytest.raises(Killed):
                call("reward", _params())
        assert not (root / "artifacts/reward/model").exists()
        return root, call("reward", _params())


@pytest.mark.slow
def test_run_writes_a_reward_model_and_held_out_metrics(resumed):
    project, result = resumed
    model_dir = project / "artifacts/reward/model"
    assert result["outputs"]["model"] == "artifacts/reward/model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1
    assert model.config.pad_token_id is not None

    metrics = json.loads((project / "artifacts/reward/metrics.json").read_text())
    assert metrics["reward_model/heldout_pairs"] == 32
    assert metrics["reward_model/train_pairs"] == 64
    assert metrics["reward_model/steps"] == 4
    # A share of the 32 held-out pairs (not of the training pairs)...
    correct = metrics["reward_model/accuracy"] * 32
    assert correct == pytest.approx(round(correct), abs=1e-4)
    # ...and those of the saved model, recomputed here with the scoring function.
    heldout = [json.loads(line) for line in (project / HELDOUT).read_text().splitlines()]
    again = reward.evaluate(*reward.load_reward_model(model_dir), heldout, batch_size=8)
    assert metrics["reward_model/accuracy"] == round(again["accuracy"], 6)
    assert metrics["reward_model/mean_margin"] == pytest.approx(again["mean_margin"], abs=1e-5)
    assert not any("runtime" in key for key in metrics)
    # Untracked (``call``), the stage keeps its last checkpoint until the runner has tracked it.
    assert (project / "artifacts/reward/checkpoints/checkpoint-4/trainer_state.json").exists()


@pytest.mark.slow
def test_a_killed_run_resumes(resumed):
    project, result = resumed
    assert result["metrics"]["reward_model/resumed_from_step"] == 2
    final = json.loads((project / "artifacts/reward/trainer_state.json").read_text())
    assert final["global_step"] == 4
    assert [e["step"] for e in final["log_history"] if "loss" in e] == [1, 2, 3, 4]


@pytest.mark.slow
def test_pairs_are_rendered_by_the_chat_template(project: Path, validated):
    data_dir = validated(pairs=8, heldout=8)
    row = json.loads((data_dir / "preferences_train.jsonl").read_text().splitlines()[0])
    trainer = reward.build_trainer(_params(), STAGES["reward"].io())
    example = trainer.train_dataset[0]
    decode = trainer.processing_class.decode
    human = f"<s>Human: {row['prompt']}\n\nAssistant: "
    assert decode(example["chosen_ids"]) == f"{human}{row['chosen']}</s>"
    assert decode(example["rejected_ids"]) == f"{human}{row['rejected']}</s>"
    assert "margin" not in trainer.train_dataset.column_names

    with_margin = reward.build_trainer(_params("reward.use_margin=true"), STAGES["reward"].io())
    assert with_margin.train_dataset[0]["margin"] == row["margin"]


@pytest.mark.slow
def test_score_is_independent_of_batching_and_padding(project: Path, base_model_dir: Path):
    model, tokenizer = reward.load_reward_model(base_model_dir)  # random head: any scores do
    prompts = ["Tell me about dogs.", "Explain rain to me.", "Give me a fact about cats."]
    responses = [
        "Dogs are loyal friends. They are lovely.",
        "Rain.",
        "Cats purr when they feel safe.",
    ]
    together = reward.score(model, tokenizer, prompts, responses, batch_size=3)
    alone = [
        reward.score(model, tokenizer, [p], [r])[0] for p, r in zip(prompts, responses, strict=True)
    ]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(together)) == 3


def test_unknown_or_reserved_reward_args_are_config_errors(project: Path, validated, rlhf):
    validated(pairs=8, heldout=8)
    with pytest.raises(ConfigError, match=r"reward\.args\.num_epochs.*'num_train_epochs'"):
        call("reward", _params("reward.args.num_epochs=2"))
    with pytest.raises(ConfigError, match=r"reward\.args\.seed: set it as reward\.seed"):
        call("reward", _params("reward.args.seed=1"))
    code, _, err = rlhf("stage", "reward", "-S", "reward.args.learning_rate=fast")
    assert code == 2
    assert "reward.args.learning_rate: expected float, got 'fast'" in err


def test_init_from_sft_needs_the_sft_model(project: Path, validated, rlhf):
    validated(pairs=8, heldout=8)
    code, _, err = rlhf("stage", "reward")  # params.yaml: init_from sft, and no SFT model yet
    assert code == 2
    assert "rlhf stage sft" in err and "Traceback" not in err


@pytest.mark.slow
def test_lora_reward_model_is_merged_with_its_trained_head(
    project: Path, validated, base_model_dir: Path
):
    validated(pairs=32, heldout=8)
    params = _params("reward.lora.enabled=true", "reward.args.learning_rate=1.0e-2")
    trainer = reward.build_trainer(params, STAGES["reward"].io())
    trainer.train()
    pairs = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    peft_scores = reward.score(trainer.model, trainer.processing_class, prompts, responses)

    out = project / "artifacts/reward/model"
    save_plain_model(trainer, out)
    assert not (out / "adapter_config.json").exists()
    merged, tokenizer = reward.load_reward_model(out)
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    # Same function as the adapter model: LoRA merged and the trained score head kept.
    assert reward.score(merged, tokenizer, prompts, responses) == pytest.approx(
        peft_scores, abs=1e-4
    )
    base = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1)
    assert not torch.allclose(
        merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    )


@pytest.mark.slow
def test_a_reward_model_that_scores_everything_the_same_fails_the_stage(
    project: Path, base_model_dir: Path
):
    from rlhf_tasks.errors import TrainingFailed

    model, tokenizer = reward.load_reward_model(base_model_dir)  # a random head: it varies
    rows = [
        {"prompt": "Tell me about dogs.", "chosen": "Dogs are loyal.", "rejected": "No."},
        {"prompt": "Tell me about rain.", "chosen": "Rain falls from clouds.", "rejected": "?"},
    ]
    varied = reward.evaluate(model, tokenizer, rows, batch_size=2)
    reward.check_not_constant(varied)
    assert varied["spread"] > 0 and varied["loss"] != pytest.approx(0.693147, abs=1e-6)

    with torch.no_grad():
        model.score.weight.zero_()  # the score no longer depends on the input
    constant = reward.evaluate(model, tokenizer, rows, batch_size=2)
    assert constant["loss"] == pytest.approx(0.693147, abs=1e-6)  # ln 2
    with pytest.raises(TrainingFailed, match=r"gives every held-out response the same score"):
        reward.check_not_constant(constant)
