"""Throughput of the validation gate on preference data of growing size.

    .venv/bin/python bench/validate_gate.py [ROWS ...]     (default: 1000 10000 50000)

Builds synthetic explicit-prompt pairs from the demo task, runs the gate (all checks, with the
demo tokenizer when artifacts/base_model exists, else without length_tokens) and prints
rows/s for loading and for checking. Run after `make demo`.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from rlhf_tasks import demo
from rlhf_tasks.config import load_params
from rlhf_tasks.data import load
from rlhf_tasks.validate import load_tokenizer, run_checks


def write_pairs(path: Path, n: int) -> None:
    rng = random.Random(0)
    prompts = demo.make_prompts()
    with path.open("w") as fh:
        for i in range(n):
            prompt = rng.choice(prompts)
            topic = demo.topic_of(prompt)
            chosen = demo.respond(topic, "good", rng)
            rejected = demo.respond(topic, rng.choice(["short", "negative", "rambling"]), rng)
            row = {"id": i, "prompt": f"{prompt} ({i})", "chosen": chosen, "rejected": rejected}
            fh.write(json.dumps(row) + "\n")


def main(sizes: list[int]) -> None:
    overrides = []
    if not Path("artifacts/base_model/tokenizer.json").exists():
        overrides.append("validate.checks.length_tokens=off")
        print("(no artifacts/base_model: length_tokens off; run `make demo` first to include it)")
    params = load_params("params.yaml", overrides)
    cfg = params.validate_config
    tokenizer, max_tokens = (None, None)
    if cfg.checks.length_tokens != "off":
        tokenizer, max_tokens = load_tokenizer(params)
    print(f"{'rows':>8} {'load s':>8} {'check s':>8} {'rows/s':>9}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pairs.jsonl"
            write_pairs(path, n)
            t0 = time.perf_counter()
            ds = load([path], kind="preferences")
            t1 = time.perf_counter()
            report = run_checks({"input": ds}, cfg, tokenizer, max_tokens)
            t2 = time.perf_counter()
        assert report.valid, [c.detail for c in report.failed]
        print(f"{n:>8} {t1 - t0:>8.2f} {t2 - t1:>8.2f} {n / (t2 - t0):>9.0f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 10000, 50000])
