"""Stage reward on a few demo pairs: outputs, the pairs' text, scoring, LoRA, resume, ranking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification
from trl import RewardTrainer

from rlhf_tasks import reward
from rlhf_tasks.config import load_params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import STAGES, call
from rlhf_tasks.training import save_plain_model

# From the random-init base model (no SFT run needed), a few steps of batch 8.
TINY = [
    "reward.init_from=base",
    "reward.args.max_steps=4",
    "reward.args.per_device_train_batch_size=8",
    "reward.args.logging_steps=1",
    "reward.args.save_steps=2",
    "reward.args.disable_tqdm=true",
]


def _params(*overrides: str, tiny: list[str] = TINY):
    return load_params("params.yaml", [*tiny, *overrides])


def test_run_writes_a_reward_model_and_held_out_metrics(project: Path, validated):
    validated(pairs=64, heldout=32)
    result = call("reward", _params())

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
    assert 0 <= metrics["reward_model/accuracy"] <= 1
    # The metrics are those of the saved model, recomputed here with the scoring function.
    heldout = [json.loads(line) for line in reward.HELDOUT.read_text().splitlines()]
    again = reward.evaluate(*reward.load_reward_model(model_dir), heldout, batch_size=8)
    assert metrics["reward_model/accuracy"] == round(again["accuracy"], 6)
    assert metrics["reward_model/mean_margin"] == pytest.approx(again["mean_margin"], abs=1e-5)
    assert not any("runtime" in key for key in metrics)
    assert not (project / "artifacts/reward/checkpoints").exists()


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


def test_lora_reward_model_is_merged_with_its_trained_head(
    project: Path, validated, base_model_dir: Path
):
    validated(pairs=32, heldout=8)
    params = _params("reward.lora.enabled=true", "reward.args.learning_rate=1.0e-2")
    trainer = reward.build_trainer(params, STAGES["reward"].io())
    trainer.train()
    pairs = [json.loads(line) for line in reward.HELDOUT.read_text().splitlines()]
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


def test_a_killed_run_resumes(project: Path, validated, monkeypatch: pytest.MonkeyPatch):
    validated(pairs=64, heldout=8)

    class Killed(Exception):
        pass

    save = RewardTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(RewardTrainer, "_save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            call("reward", _params())
    result = call("reward", _params())
    assert result["metrics"]["reward_model/resumed_from_step"] == 2
    final = json.loads((project / "artifacts/reward/trainer_state.json").read_text())
    assert final["global_step"] == 4


# Clearly better and clearly worse answers to held-out prompts (gold scores about 4 vs. below 0).
# Not an off-topic answer: telling topics apart takes more than a short training from the random
# base model (tests/model/test_reward_quality.py checks it on the default reward model).
GOOD_AND_BAD = [
    (
        "Tell me about dogs.",
        "Dogs are loyal friends. Many dogs like to play fetch with a ball. They are lovely.",
        "I do not know much about dogs.",
    ),
    (
        "Give me a fact about cats.",
        "Cats purr when they feel safe. Most cats like to climb and explore. They are lovely.",
        "Most cats are boring and bad.",
    ),
    (
        "Write a sentence about bread.",
        "Fresh bread is baked in a hot oven. Bread goes well with butter and soup.",
        "The bread was",
    ),
    (
        "Give me a fact about apples.",
        "Apples grow on trees in orchards. Most apples are sweet and crunchy. They are lovely.",
        "apples are sweet and crunchy fresh apples make a healthy snack",
    ),
    (
        "Say something nice about birds.",
        "Birds sing songs in the morning. Most birds build nests in tall trees.",
        "Sorry, I can not help with birds.",
    ),
    (
        "Tell me about music.",
        "Live music can lift your mood. Music is played on many instruments. It is wonderful.",
        "I hate music, they are dull.",
    ),
]


QUICK_TRAINING = [
    "reward.args.max_steps=120",
    "reward.args.per_device_train_batch_size=16",
    "reward.args.learning_rate=1.0e-3",
]


def test_a_briefly_trained_reward_model_ranks_good_answers_above_bad_ones(project: Path, validated):
    validated(pairs=None, heldout=8)
    short = ["reward.init_from=base", "reward.args.disable_tqdm=true", *QUICK_TRAINING]
    result = call("reward", _params(tiny=short))
    model, tokenizer = reward.load_reward_model(result["outputs"]["model"])
    prompts, good, bad = (list(column) for column in zip(*GOOD_AND_BAD, strict=True))
    good_scores = reward.score(model, tokenizer, prompts, good)
    bad_scores = reward.score(model, tokenizer, prompts, bad)
    assert all(g > b for g, b in zip(good_scores, bad_scores, strict=True)), (
        good_scores,
        bad_scores,
    )
