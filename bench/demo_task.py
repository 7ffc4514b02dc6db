"""Figures of the demo task: gold scores by response kind, reward-hacking examples, label stats.

    .venv/bin/python bench/demo_task.py

Prints a table; asserts nothing (tests/code/test_demo.py holds the behaviour).
"""

from __future__ import annotations

import random
import statistics

from rlhf_tasks import demo
from rlhf_tasks.config import DataConfig, DemoConfig

HACKS = {
    "truncated": "The dog was",
    "positive words, repeated": "Dogs are great great great.",
    "topic words, repeated": "Dogs dogs dogs are great great great.",
    "positive word salad": "Great wonderful lovely amazing dogs love fun.",
    "good answer (reference)": "Dogs love long walks in the park. Dogs can learn simple tricks.",
}


def main() -> None:
    rng = random.Random(0)
    print(f"{'kind':<12} {'mean':>6} {'sd':>5} {'min':>6} {'max':>6}   (gold score, n=800 each)")
    for kind in demo.PAIR_KINDS:
        scores = []
        for _ in range(800):
            topic = rng.choice(demo.TOPICS)
            prompt = rng.choice(demo.TEMPLATES).format(x=topic.name, c=rng.choice(demo.CONTEXTS))
            scores.append(demo.gold_score(prompt, demo.respond(topic, kind, rng)))
        print(
            f"{kind:<12} {statistics.mean(scores):6.2f} {statistics.pstdev(scores):5.2f} "
            f"{min(scores):6.2f} {max(scores):6.2f}"
        )
    print("\nreward-hacking responses to 'Tell me about dogs.':")
    for name, text in HACKS.items():
        print(f"  {demo.gold_score('Tell me about dogs.', text):6.2f}  {name:<26} {text!r}")

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        stats = demo.generate(DemoConfig(), DataConfig(), root=Path(tmp))
    train, heldout = stats["preferences"]["train"], stats["preferences"]["heldout"]
    print(
        f"\nannotator agreement with the gold order: train {train['agreement_with_gold']:.3f}, "
        f"held-out {heldout['agreement_with_gold']:.3f}; SFT gold mean "
        f"{stats['sft']['gold_mean']:.2f}"
    )


if __name__ == "__main__":
    main()
