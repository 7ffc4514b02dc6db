"""The reward model that params.yaml's defaults train on the demo data: held-out accuracy.

SFT and reward with the default hyperparameters, on all the demo data, from the demo base model:
about 80 s on 2 CPU cores (`.venv/bin/python bench/train_stages.py` prints the figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_tasks import reward, sft
from rlhf_tasks.config import load_params

pytestmark = pytest.mark.slow

# The annotators agree with the gold order on ~93% of held-out pairs: the ceiling. The defaults
# reach 0.86 here; "the longer one" scores 0.54, and 120 steps from the base model 0.71-0.73.
MIN_ACCURACY = 0.80

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


def test_default_reward_model_is_accurate_on_held_out_pairs(project: Path, validated):
    validated(sft=None, pairs=None, heldout=None)
    params = load_params("params.yaml")
    sft.run(params)
    result = reward.run(params)

    metrics = json.loads((project / "artifacts/reward/metrics.json").read_text())
    assert metrics["reward_model/heldout_pairs"] == 400
    assert metrics["reward_model/accuracy"] >= MIN_ACCURACY, metrics
    assert metrics["reward_model/mean_margin"] > 0

    model, tokenizer = reward.load_reward_model(result["outputs"]["model"])
    prompts, good, off_topic = (list(column) for column in zip(*OFF_TOPIC, strict=True))
    good_scores = reward.score(model, tokenizer, prompts, good)
    off_scores = reward.score(model, tokenizer, prompts, off_topic)
    assert all(g > o for g, o in zip(good_scores, off_scores, strict=True)), (
        good_scores,
        off_scores,
    )
