"""The validation gate on preference data of growing size: throughput, and peak memory.

    .venv/bin/python bench/validate_gate.py [ROWS ...]        rows/s (default: 1000 10000 50000)
    .venv/bin/python bench/validate_gate.py --gigabytes 0.1 1  peak memory of `rlhf validate`

Builds synthetic explicit-prompt pairs from the demo task (every pair distinct, so every check
passes). The first form runs the gate in this process (all checks, with the demo tokenizer when
artifacts/base_model exists, else without length_tokens) and prints rows/s. The second writes
JSONL files of the given sizes (pairs of about 1 KB, like real preference data), runs the real
command `rlhf validate FILE` on each, and prints its wall time and peak resident memory (the
child's ru_maxrss): with chunked validation the peak should not grow with the file. Run after
`make demo` (for the tokenizer); the files go to a temporary directory (2.2 GB free for 1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf_tasks import demo
from rlhf_tasks.config import load_params
from rlhf_tasks.rows import TokenLimit, token_limit
from rlhf_tasks.validate import Source, load_tokenizer, run_checks

BIN = Path(sys.executable).parent


def _pairs(rng: random.Random, prompts: list[str], i: int, sentences: int) -> dict:
    prompt = rng.choice(prompts)
    topic = demo.topic_of(prompt)

    def answer(kind: str) -> str:
        return " ".join(demo.respond(topic, kind, rng) for _ in range(sentences))

    bad = rng.choice(["short", "negative", "rambling"])
    return {"id": i, "prompt": f"{prompt} ({i})", "chosen": answer("good"), "rejected": answer(bad)}


def write_pairs(path: Path, n: int | None = None, size: int | None = None, sentences: int = 1):
    """``n`` pairs, or pairs until the file holds ``size`` bytes; returns the number of rows."""
    rng = random.Random(0)
    prompts = demo.make_prompts()
    written = rows = 0
    with path.open("w") as fh:
        while (n is not None and rows < n) or (size is not None and written < size):
            line = json.dumps(_pairs(rng, prompts, rows, sentences)) + "\n"
            fh.write(line)
            written += len(line)
            rows += 1
    return rows


def throughput(sizes: list[int]) -> None:
    overrides = []
    if not Path("artifacts/base_model/tokenizer.json").exists():
        overrides.append("validate.checks.length_tokens=off")
        print("(no artifacts/base_model: length_tokens off; run `make demo` first to include it)")
    params = load_params("params.yaml", overrides)
    cfg = params.validate_config
    tokenizer, limits = None, None
    if cfg.checks.length_tokens != "off":
        tokenizer, model_max = load_tokenizer(params)

        def limits(kind: str, heldout: bool) -> TokenLimit:
            return token_limit(params, kind, heldout, model_max)

    print(f"{'rows':>8} {'check s':>8} {'rows/s':>9}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pairs.jsonl"
            write_pairs(path, n=n)
            t0 = time.perf_counter()
            report = run_checks(
                {"input": Source((str(path),), "preferences")}, cfg, tokenizer, limits
            )
            t1 = time.perf_counter()
        assert report.valid, [c.detail for c in report.failed]
        print(f"{n:>8} {t1 - t0:>8.2f} {n / (t1 - t0):>9.0f}")


def peak_memory(gigabytes: list[float]) -> None:
    """`rlhf validate` on files of these sizes: wall time and the child's peak RSS."""
    # Long pairs (about 1 KB) exceed the demo model's 128 tokens: the limit is raised, not off,
    # so that tokenisation is measured too.
    args = ["-S", "validate.max_tokens=4096"]
    if not Path("artifacts/base_model/tokenizer.json").exists():
        args = ["-S", "validate.checks.length_tokens=off"]
        print("(no artifacts/base_model: length_tokens off; run `make demo` first to include it)")
    print(
        f"{'file GB':>8} {'rows':>9} {'chunks':>7} {'wall s':>8} {'rows/s':>8} {'peak RSS GiB':>13}"
    )
    for gb in gigabytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pairs.jsonl"
            rows = write_pairs(path, size=int(gb * 1e9), sentences=4)
            size = path.stat().st_size / 1e9
            out = Path(tmp) / "report"
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [BIN / "rlhf", "validate", str(path), "--out", str(out), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            output = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"rlhf validate failed:\n{output}")
            report = json.loads((out / "report.json").read_text())
        chunks = report["datasets"]["input"]["chunks"]
        peak = usage.ru_maxrss / 2**20  # KiB on Linux
        print(f"{size:>8.2f} {rows:>9} {chunks:>7} {wall:>8.1f} {rows / wall:>8.0f} {peak:>13.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", type=int, default=[1000, 10000, 50000])
    parser.add_argument("--gigabytes", nargs="+", type=float, help="peak memory on files this big")
    ns = parser.parse_args()
    if ns.gigabytes:
        peak_memory(ns.gigabytes)
    else:
        throughput(ns.rows)
