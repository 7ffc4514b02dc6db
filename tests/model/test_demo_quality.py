"""The quality bars of the demo with the default params.yaml, on the outputs of the whole
pipeline run as `make demo` runs it (the session's ``demo_run`` fresh clone).

- the reward model: held-out accuracy at least 0.80, beside the annotators' noise ceiling; it
  tells an answer on the topic from a well-formed answer on another topic, and ranks clearly good
  answers above clearly bad ones;
- the policy (PPO by default): the gold judge prefers it to SFT on at least 70% of held-out
  samples (the defaults give 0.756-0.768 over three PPO seeds on this machine kind; the
  evaluation's standard error is about 0.02), with its KL to SFT inside the configured budget and
  no degeneration (mean length and distinct-2 within 20% of SFT's, unless the judge prefers the
  change).

Training times are printed by `bench/demo_time.py`, never asserted.
"""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf_tasks import reward

pytestmark = pytest.mark.slow

MIN_REWARD_ACCURACY = 0.80
MIN_GOLD_WIN_RATE = 0.70
MAX_STYLE_CHANGE = 0.20

# A good answer against an answer on another topic, which a reward model that only looks at the
# form of a sentence cannot tell apart.
OFF_TOPIC = [
    (
        "Explain rain to me.",
        "Rain helps plants and crops grow. Gentle rain fills rivers and lakes. It is great.",
        "Most cats sleep for many hours a day. Cats purr when they feel safe.",
    ),
    (
        "Tell me about bread.",
        "Fresh bread is baked in a hot oven. Bread goes well with butter and soup.",
        "Many dogs like to play fetch with a ball. Dogs are loyal friends.",
    ),
]


# Clearly better and clearly worse answers to held-out prompts (gold scores about 4 vs. below 0):
# a short answer, a refusal, a cut-off answer, a list of keywords, a rude one.
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


@pytest.fixture(scope="module")
def metrics(demo_run) -> dict[str, float]:
    return json.loads((demo_run.clone / "artifacts/evaluate/metrics.json").read_text())


def test_reward_model_is_accurate_on_held_out_pairs(demo_run, metrics) -> None:
    stage = json.loads((demo_run.clone / "artifacts/reward/metrics.json").read_text())
    assert stage["reward_model/heldout_pairs"] == 400
    # The stage's own held-out figure and the evaluation's agree: same model, same pairs.
    assert stage["reward_model/accuracy"] == pytest.approx(metrics["reward_model/accuracy"])
    print(
        f"reward model accuracy {metrics['reward_model/accuracy']:.3f} "
        f"(annotators' ceiling {metrics['reward_model/noise_ceiling']:.3f}, "
        f"vs gold order {metrics['reward_model/accuracy_gold']:.3f})"
    )
    assert metrics["reward_model/accuracy"] >= MIN_REWARD_ACCURACY, metrics
    assert metrics["reward_model/accuracy"] <= metrics["reward_model/noise_ceiling"] + 0.05


@pytest.mark.parametrize(
    "pairs", [pytest.param(OFF_TOPIC, id="to_off_topic"), pytest.param(GOOD_AND_BAD, id="to_bad")]
)
def test_reward_model_prefers_the_good_answer(demo_run, pairs) -> None:
    """The good answer scores above an answer on another topic, and above a clearly bad one."""
    model, tokenizer = reward.load_reward_model(demo_run.clone / "artifacts/reward/model")
    prompts, good, bad = (list(column) for column in zip(*pairs, strict=True))
    good_scores = reward.score(model, tokenizer, prompts, good)
    bad_scores = reward.score(model, tokenizer, prompts, bad)
    assert all(g > b for g, b in zip(good_scores, bad_scores, strict=True)), (
        good_scores,
        bad_scores,
    )


def test_policy_beats_sft_by_the_gold_judge_within_the_kl_budget(demo_run, metrics) -> None:
    params = yaml.safe_load((demo_run.clone / "params.yaml").read_text())
    assert params["policy"]["algorithm"] == "ppo"
    print({k: v for k, v in metrics.items() if k.split("/")[0] in ("gold", "policy", "sft")})
    assert metrics["gold/win_rate_vs_sft"] >= MIN_GOLD_WIN_RATE, metrics
    assert metrics["gold/policy_score"] > metrics["gold/sft_score"]
    assert metrics["policy/reward_mean"] > metrics["sft/reward_mean"]
    assert metrics["policy/kl_to_sft"] <= params["evaluate"]["kl_budget"]
    assert metrics["checks/kl_within_budget"] == 1.0


def test_policy_does_not_degenerate(metrics) -> None:
    """Length and diversity stay within 20% of SFT's, unless the gold judge prefers the change
    (the demo's judge rewards two facts over one: somewhat longer answers can be better ones)."""
    for key in ("mean_length", "distinct_2"):
        change = abs(metrics[f"policy/{key}"] - metrics[f"sft/{key}"]) / metrics[f"sft/{key}"]
        assert change <= MAX_STYLE_CHANGE or metrics["gold/win_rate_vs_sft"] > 0.5, (key, metrics)
    assert metrics["checks/no_degeneration"] == 1.0
