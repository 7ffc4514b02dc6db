"""Iterated RLHF on the demo (``rlhf rounds N``): what each round of collect -> label -> pull
-> retrain -> evaluate -> promote did, as one row of a table.

A row holds the round's pairs (asked, added, left out: tie, both bad or no majority) and the
figures reward hacking is read from: the reward model's held-out accuracy, the policy's gold
score, its gold win rate against SFT and against the champion it challenged (the promote
stage's comparison), the share of its answers that state a fact twice, its distinct-2 and its
KL to SFT. Round 0 is where the rounds started (the project's last evaluation). The table is
written after every round to ``artifacts/rounds/rounds.json`` and ``rounds.md``, so a stopped
run keeps the rounds it finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf_tasks.metrics import stage_metrics
from rlhf_tasks.stages import STAGES

DEFAULT_OUT = Path("artifacts/rounds")

# (column, heading, format) of the table, in order.
COLUMNS = (
    ("round", "round", "{}"),
    ("tasks", "tasks", "{}"),
    ("pairs_added", "pairs added", "{}"),
    ("left_out", "left out (tie, both bad)", "{}"),
    ("train_pairs", "training pairs", "{}"),
    ("rm_accuracy", "RM held-out acc.", "{:.3f}"),
    ("gold_score", "gold score", "{:.2f}"),
    ("win_vs_sft", "gold win vs SFT", "{:.3f}"),
    ("win_vs_champion", "gold win vs champion", "{:.3f}"),
    ("repeats", "repeats a fact", "{:.1%}"),
    ("rm_prefers_repeat", "RM prefers a repeat", "{:.1%}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("kl", "KL to SFT", "{:.2f}"),
    ("promoted", "promoted", "{}"),
)


def row(number: int, root: Path = Path(), **extra: Any) -> dict[str, Any]:
    """The figures of round ``number`` from the project's stage outputs (after its retrain)."""
    evaluation = stage_metrics("evaluate", root)
    reward = stage_metrics("reward", root)
    decision_file = root / STAGES["promote"].workdir / "decision.json"
    decision = json.loads(decision_file.read_text()) if decision_file.exists() else {}
    out: dict[str, Any] = {
        "round": number,
        "train_pairs": reward.get("reward_model/train_pairs"),
        "rm_accuracy": evaluation.get("reward_model/accuracy"),
        "gold_score": evaluation.get("gold/policy_score"),
        "win_vs_sft": evaluation.get("gold/win_rate_vs_sft"),
        "win_vs_champion": (  # the baseline is "sft" when there was no champion to challenge
            decision.get("win_rate") if decision.get("baseline", "sft") != "sft" else None
        ),
        "repeats": evaluation.get("gold/policy_repeats_a_fact"),
        "distinct_2": evaluation.get("policy/distinct_2"),
        "kl": evaluation.get("policy/kl_to_sft"),
        "rm_prefers_repeat": (repeat_probe(root) or {}).get("prefers"),
        "promoted": ("yes" if decision.get("promoted") else "no") if decision else None,
        "sft_repeats": evaluation.get("gold/sft_repeats_a_fact"),
        "sft_distinct_2": evaluation.get("sft/distinct_2"),
    }
    return out | extra


def repeat_probe(root: Path = Path()) -> dict[str, float] | None:
    """``demo.repeat_probes`` on the held-out prompts, scored by the project's reward model:
    ``prefers``, the share where it scores a fact said twice above two facts (the gold judge:
    never), ``margin``, its mean score difference, and ``probes``; None off the demo."""
    from rlhf_tasks import demo, reward
    from rlhf_tasks.config import DataConfig

    model_dir = root / STAGES["reward"].outputs["model"].path
    prompts_file = root / DataConfig().prompts_heldout
    if not (model_dir / "config.json").exists() or not prompts_file.exists():
        return None
    lines = prompts_file.read_text(encoding="utf-8").splitlines()
    cases = demo.repeat_probes([json.loads(line).get("prompt", "") for line in lines if line])
    if not cases:
        return None
    model, tokenizer = reward.load_reward_model(model_dir)
    prompts = [case[0] for case in cases]
    repeat = reward.score(model, tokenizer, prompts, [case[1] for case in cases])
    two = reward.score(model, tokenizer, prompts, [case[2] for case in cases])
    gaps = [r - t for r, t in zip(repeat, two, strict=True)]
    return {
        "prefers": sum(g > 0 for g in gaps) / len(gaps),
        "margin": sum(gaps) / len(gaps),
        "probes": len(gaps),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, SFT's repeats and distinct-2 below it."""
    lines = [
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    last = rows[-1]
    if last.get("sft_repeats") is not None:
        lines += [
            "",
            f"SFT on the same prompts: repeats a fact {last['sft_repeats']:.1%}, "
            f"distinct-2 {last['sft_distinct_2']:.3f}.",
        ]
    return "\n".join(lines)


def write(rows: list[dict[str, Any]], out_dir: Path = DEFAULT_OUT) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rounds.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out_dir / "rounds.md").write_text(table(rows) + "\n", encoding="utf-8")
    return out_dir / "rounds.md"
