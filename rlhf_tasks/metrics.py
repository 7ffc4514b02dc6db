"""The figures a user looks at after a run: the key metrics of the stages' ``metrics.json``, for
``rlhf run``, ``rlhf metrics`` and the Prefect evaluation artifact."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_tasks.stages import STAGES

# The figures a user looks at after a run: (stage, metrics key, label). Missing ones are skipped.
KEY_METRICS = [
    ("reward", "reward_model/accuracy", "reward model: held-out accuracy"),
    ("judge", "judge/accuracy", "judge (held-out reward model): accuracy"),
    ("evaluate", "reward_model/noise_ceiling", "   annotators' agreement with gold (ceiling)"),
    ("evaluate", "reward_model/accuracy_gold", "reward model: accuracy vs gold order"),
    ("evaluate", "sft/reward_mean", "SFT: reward-model score"),
    ("evaluate", "policy/reward_mean", "policy: reward-model score"),
    ("evaluate", "gold/sft_score", "SFT: gold score"),
    ("evaluate", "gold/policy_score", "policy: gold score"),
    ("evaluate", "judge/win_rate_vs_sft", "policy: judge's win rate vs SFT"),
    ("evaluate", "policy/kl_to_sft", "policy: KL to SFT (nats/response)"),
    ("evaluate", "sft/mean_length", "SFT: mean length (words)"),
    ("evaluate", "policy/mean_length", "policy: mean length (words)"),
    ("evaluate", "sft/distinct_2", "SFT: distinct-2"),
    ("evaluate", "policy/distinct_2", "policy: distinct-2"),
    ("evaluate", "gold/sft_repeats_a_fact", "SFT: share of answers that repeat a fact"),
    ("evaluate", "gold/policy_repeats_a_fact", "policy: share of answers that repeat a fact"),
    ("evaluate", "checks/kl_within_budget", "check: KL within budget (1 = pass)"),
    ("evaluate", "checks/no_degeneration", "check: no degeneration (1 = pass)"),
]


def stage_metrics(stage: str, root: Path = Path()) -> dict:
    """What the stage's metrics file (its registry output) holds; {} before it has run."""
    path = STAGES[stage].metrics_file()
    return json.loads((root / path).read_text()) if path and (root / path).exists() else {}


def metrics_table(root: Path = Path()) -> str:
    """The key metrics of each stage's metrics file in the project ``root``, one per line."""
    loaded: dict[str, dict] = {}
    lines = []
    for stage, key, label in KEY_METRICS:
        if stage not in loaded:
            loaded[stage] = stage_metrics(stage, root)
        if key in loaded[stage]:
            lines.append(f"  {label:<46} {loaded[stage][key]:>8.3f}")
    run_file = root / STAGES["policy"].workdir / "run.json"
    if run_file.exists():
        lines.insert(
            0,
            f"  {'policy algorithm':<46} {json.loads(run_file.read_text())['policy/algorithm']:>8}",
        )
    if not lines:
        return "no metrics yet: run the pipeline first (`rlhf run` or `dvc repro`)"
    return "\n".join(["key metrics (artifacts/*/metrics.json):", *lines])
