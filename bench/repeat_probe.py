"""Does a project's reward model prefer a fact said twice? The demo policy's reward hack ("Most
cats purr when they feel safe. Many cats purr when they feel safe.") against the same first
sentence followed by another fact, on the held-out prompts: the gold judge prefers the second
every time (a fact said again costs what it gave).

    .venv/bin/python bench/repeat_probe.py [PROJECT_DIR ...]   # default: the current directory

Prints, for each project's ``artifacts/reward/model``, the share of probes where the reward
model scores the repeat higher (0 is what labels on the hack should teach it; 0.5 is a coin),
and the mean score margin. Used for the `rlhf rounds` figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_tasks import demo, reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("projects", nargs="*", default=["."])
    args = parser.parse_args()
    for root in map(Path, args.projects):
        lines = (root / "data/prompts/heldout.jsonl").read_text().splitlines()
        cases = demo.repeat_probes([json.loads(line)["prompt"] for line in lines])
        assert all(demo.repeats_a_fact(p, r) and not demo.repeats_a_fact(p, t) for p, r, t in cases)
        model, tokenizer = reward.load_reward_model(root / "artifacts/reward/model")
        prompts = [p for p, _, _ in cases]
        repeat = reward.score(model, tokenizer, prompts, [r for _, r, _ in cases])
        two = reward.score(model, tokenizer, prompts, [t for _, _, t in cases])
        prefers = sum(r > t for r, t in zip(repeat, two, strict=True)) / len(cases)
        margin = sum(r - t for r, t in zip(repeat, two, strict=True)) / len(cases)
        print(
            f"{root}: the reward model prefers the repeat in {prefers:.1%} of {len(cases)} "
            f"probes (mean margin {margin:+.3f})"
        )


if __name__ == "__main__":
    main()
