"""The held-out judge (``evaluate.judge: heldout_rm``): the split of the training pairs between
the reward model and the judge, the judge stage, and the evaluation that uses it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import FEW_STEPS

from rlhf_tasks import preflight
from rlhf_tasks.config import load_params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.judge import NOT_TRAINED
from rlhf_tasks.reward import judge_split
from rlhf_tasks.stages import call


def _pairs(prompts: int, per_prompt: int) -> list[dict]:
    return [
        {"prompt": f"Question {p}?", "chosen": f"good {i}", "rejected": f"bad {i}"}
        for p in range(prompts)
        for i in range(per_prompt)
    ]


def test_the_split_keeps_every_prompt_on_one_side_whatever_the_order(project: Path):
    rows = _pairs(400, 3)
    params = load_params("params.yaml", ["judge.fraction=0.25"])
    mine, judges = judge_split(rows, params)
    assert len(mine) + len(judges) == len(rows)
    assert {r["prompt"] for r in mine}.isdisjoint({r["prompt"] for r in judges})
    assert 0.18 < len({r["prompt"] for r in judges}) / 400 < 0.32  # a hash: about the fraction
    shuffled = random.Random(0).sample(rows, len(rows))
    _, again = judge_split(shuffled, params)
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, judges))
    # A larger fraction only moves prompts to the judge: the reward model's set shrinks.
    _, more = judge_split(rows, load_params("params.yaml", ["judge.fraction=0.5"]))
    assert {r["prompt"] for r in judges} <= {r["prompt"] for r in more}
    # No judge: every pair is the reward model's.
    assert judge_split(rows, load_params("params.yaml")) == (rows, [])


def test_heldout_rm_needs_a_judge_fraction_before_anything_runs(project: Path):
    params = load_params("params.yaml", ["evaluate.judge=heldout_rm"])
    with pytest.raises(ConfigError, match=r"judge\.fraction is 0: set it"):
        preflight._check_judge(params)
    preflight._check_judge(
        load_params("params.yaml", ["evaluate.judge=heldout_rm", "judge.fraction=0.2"])
    )


@pytest.mark.slow
def test_the_judge_trains_on_the_pairs_the_reward_model_never_saw(project: Path, validated):
    validated(sft=32, pairs=96, heldout=32, prompts=8)
    params = load_params(
        "params.yaml",
        [*FEW_STEPS, "judge.fraction=0.5", "evaluate.judge=heldout_rm"],
    )
    call("base_model", params)
    call("sft", params)
    rewarded = call("reward", params)["metrics"]
    judged = call("judge", params)["metrics"]

    # Together they read every pair once; neither counts the other's share as lost.
    assert rewarded["reward_model/rows_read"] == judged["judge/rows_read"] == 96
    assert rewarded["reward_model/rows_kept"] == judged["judge/rows_set_aside"]
    assert judged["judge/rows_kept"] == rewarded["reward_model/rows_set_aside"]
    assert rewarded["reward_model/rows_dropped"] == judged["judge/rows_dropped"] == 0
    assert judged["judge/trained"] == 1 and judged["judge/heldout_pairs"] == 32
    assert Path("artifacts/judge/model/config.json").exists()
    assert json.loads(Path("artifacts/judge/metrics.json").read_text()) == {
        k: v for k, v in judged.items() if not k.endswith(("runtime_s", "per_second", "_step"))
    }

    # The evaluation judges with it: the judge's scores, not the reward model's.
    call("policy", params)
    metrics = call("evaluate", params)["metrics"]
    assert "gold/win_rate_vs_sft" not in metrics and "judge/policy_score" in metrics
    assert metrics["judge/policy_score"] != pytest.approx(metrics["policy/reward_mean"])
    assert "held-out judge (stage judge)" in Path("artifacts/evaluate/report.md").read_text()

    # judge.fraction back to 0: no judge, and evaluate refuses heldout_rm with a clear message.
    none = load_params("params.yaml", [*FEW_STEPS, "evaluate.judge=heldout_rm"])
    assert call("judge", none)["metrics"] == {"judge/trained": 0}
    assert [p.name for p in Path("artifacts/judge/model").iterdir()] == [NOT_TRAINED]
    with pytest.raises(ConfigError, match="there is no judge model in artifacts/judge/model"):
        call("evaluate", none)
