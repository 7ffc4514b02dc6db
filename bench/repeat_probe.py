"""Does a project's reward model prefer a fact said twice? The demo policy's reward hack ("Most
cats purr when they feel safe. Many cats purr when they feel safe.") against the same first
sentence followed by another fact, on the held-out prompts: the gold judge prefers the second
every time (a fact said again costs what it gave).

    .venv/bin/python bench/repeat_probe.py [PROJECT_DIR ...]   # default: the current directory

Prints, for each project's ``artifacts/reward/model`` (``rounds.repeat_probe``), the share of
probes where the reward model scores the repeat higher (0 is what labels on the hack should
teach it; 0.5 is a coin), and the mean score margin. Used for the `rlhf rounds` figures in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_tasks.rounds import repeat_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("projects", nargs="*", default=["."])
    args = parser.parse_args()
    for root in map(Path, args.projects):
        found = repeat_probe(root)
        if found is None:
            print(f"{root}: no reward model or no demo prompts to probe")
            continue
        print(
            f"{root}: the reward model prefers the repeat in {found['prefers']:.1%} of "
            f"{found['probes']} probes (mean margin {found['margin']:+.3f})"
        )


if __name__ == "__main__":
    main()
