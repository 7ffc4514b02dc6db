"""The evaluate stage: metric definitions on literals, and a run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_tasks import reward
from rlhf_tasks.config import EvaluateSection
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.evaluate import _chat, checks, distinct_2, evaluate, win_rate
from rlhf_tasks.ppo import token_scores

REQUIRED = {
    "reward_model/accuracy",
    "reward_model/accuracy_gold",
    "policy/reward_mean",
    "sft/reward_mean",
    "policy/kl_to_sft",
    "policy/mean_length",
    "policy/distinct_2",
    "sft/mean_length",
    "sft/distinct_2",
    "gold/policy_score",
    "gold/sft_score",
    "gold/policy_repeats_a_fact",
    "gold/sft_repeats_a_fact",
    "gold/win_rate_vs_sft",
    "judge/win_rate_vs_sft",
}


@pytest.fixture(scope="module")
def reward_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reward")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out)
    return out


def test_distinct_2_counts_unique_word_bigrams() -> None:
    assert distinct_2(["a b c", "a b d"]) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert distinct_2(["dogs dogs dogs dogs"]) == pytest.approx(1 / 3)


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate([2.0, 1.0, 0.0], [1.0, 1.0, 1.0]) == pytest.approx(0.5)


@pytest.mark.slow
def test_evaluation_scores_like_ppo_does(base_model_dir: Path, reward_dir: Path) -> None:
    """The score evaluation reports is the score PPO maximised: same text, same last token."""
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    prompts = ["Tell me about dogs.", "Describe rain."]
    responses = ["Dogs are loyal friends.", "Rain falls from dark clouds. It is lovely."]
    scores = reward.score(model, tokenizer, prompts, responses)
    for prompt, response, score in zip(prompts, responses, scores, strict=True):
        ids = tokenizer(_chat(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids])
        with torch.no_grad():
            per_token = token_scores(model, ids, torch.ones_like(ids))
        assert score == pytest.approx(per_token[0, -1].item(), abs=1e-5)
    assert tokenizer.decode(ids[0]).endswith("It is lovely.</s>")


@pytest.mark.slow
def test_run_writes_every_metric_report_and_plots(
    base_model_dir: Path, reward_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Tell me about {t}."}) + "\n"
            for t in ("dogs", "cats", "rain", "music")
        )
    )
    heldout = demo_root / "data/preferences/heldout.jsonl"
    history = tmp_path / "history.jsonl"
    history.write_text(
        "".join(
            json.dumps(
                {
                    "episode": e,
                    "objective/scores": 0.1 * e,
                    "objective/rlhf_reward": 0.0,
                    "objective/kl": 0.01 * e,
                }
            )
            + "\n"
            for e in (8, 16)
        )
    )
    result = evaluate(
        EvaluateSection(max_new_tokens=8),
        policy_dir=base_model_dir,
        sft_dir=base_model_dir,
        reward_dir=reward_dir,
        prompts=prompts,
        pairs=heldout,
        history=history,
        out_dir=tmp_path / "out",
    )

    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert set(metrics) >= REQUIRED
    assert metrics == result["metrics"]
    # The same model as policy and SFT, sampled with the same seed: identical generations.
    assert metrics["policy/kl_to_sft"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["gold/win_rate_vs_sft"] == pytest.approx(0.5)
    # The reward model's accuracy is the reward stage's figure for that model on those pairs.
    pairs = [json.loads(line) for line in heldout.read_text().splitlines()]
    again = reward.evaluate(*reward.load_reward_model(reward_dir), pairs, batch_size=64)
    assert metrics["reward_model/accuracy"] == pytest.approx(again["accuracy"])
    report = (tmp_path / "out/report.md").read_text()
    assert "| prompt | SFT | policy |" in report and "Tell me about dogs." in report
    for png in ("reward_model_scores.png", "reward_kl.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(b"\x89PNG")
    assert metrics["checks/kl_within_budget"] == 1.0
    assert 0.5 < metrics["reward_model/noise_ceiling"] <= 1.0


@pytest.mark.slow
def test_gold_judge_refuses_prompts_that_are_not_the_demo_s(
    base_model_dir: Path, reward_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Summarise this contract."}) + "\n")
    with pytest.raises(ConfigError, match=r"evaluate\.judge=gold is the demo task.s judge"):
        evaluate(
            EvaluateSection(),
            policy_dir=base_model_dir,
            sft_dir=base_model_dir,
            reward_dir=reward_dir,
            prompts=prompts,
            pairs=demo_root / "data/preferences/heldout.jsonl",
            out_dir=tmp_path / "out",
        )


BASE = {
    "sft/mean_length": 10.0,
    "sft/distinct_2": 0.5,
    "policy/mean_length": 11.5,
    "policy/distinct_2": 0.45,
    "policy/kl_to_sft": 3.0,
    "judge/win_rate_vs_sft": 0.4,
}


@pytest.mark.parametrize(
    ("change", "kl_ok", "style_ok"),
    [
        ({}, 1.0, 1.0),  # within 20% on both, KL under budget
        ({"policy/kl_to_sft": 5.5}, 0.0, 1.0),  # over the 5-nat budget
        ({"policy/mean_length": 12.5}, 1.0, 0.0),  # 25% longer, and the judge does not like it
        ({"policy/distinct_2": 0.35}, 1.0, 0.0),  # 30% less diverse
        ({"policy/mean_length": 12.5, "judge/win_rate_vs_sft": 0.8}, 1.0, 1.0),  # judge prefers
    ],
)
def test_checks_flag_kl_over_budget_and_degeneration(change, kl_ok, style_ok) -> None:
    result = checks({**BASE, **change}, kl_budget=5.0)
    assert result == {"checks/kl_within_budget": kl_ok, "checks/no_degeneration": style_ok}
