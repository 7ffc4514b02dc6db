"""Our PPO against TRL 1.12.0's PPOTrainer, in interleaved pairs on the demo.

    .venv/bin/python bench/ppo_vs_trl.py [--project DIR] [--pairs N] [--threads N] [-S ppo.k=v ...]

The same SFT model, reward model (also each value model's start), RL prompts, rollout batch,
minibatch, PPO epochs, response length, number of updates, hyperparameters (params.yaml's `ppo`
section and `-S` overrides) and CPU threads. The trainers run in turns, ours then TRL's, ``--pairs``
times (default 3), each run in a fresh process; pair i uses the seed ``ppo.seed + i`` for both,
so the quality figures are over as many seeds as pairs. (The machine's speed drifts within
minutes: a pair's two runs are minutes apart, so the ratio within each pair is the figure to
trust, and its median and range over the pairs.) TRL 1.12.0 runs in its own virtual
environment, ``bench/.venv-trl112`` (created on first use: TRL 1.12.0 with the project's locked
torch, transformers, accelerate and datasets, so the libraries under both trainers are the
same); ``bench/ppo_trl112.py`` drives it.

Without ``--project``, a scratch copy of the repository gets the demo data and trains the
``base_model``, ``validate``, ``sft`` and ``reward`` stages first (a few minutes).

Prints each run's episodes per second and where its loop's time went; then, for each trainer,
the median and range of episodes per second and of the time split (generation, scoring,
optimisation), the mean and spread over the seeds of the evaluate stage's figures for its
policy on the held-out prompts (gold score, gold win rate against SFT, KL to SFT); and last the
line ``ratio ours/TRL: median M (range A-B) over N pairs``. Figures only; asserts nothing.
Differences that remain: TRL trains policy and value with one optimiser (ours: one each, same
learning rate by default), TRL's Adam eps is 1e-8 (ours 1e-5), ours writes its resumable
checkpoints (every ``ppo.save_every`` updates) and TRL saves none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from demo_copy import ROOT, demo_copy
from summary import mean_spread, median_range

BIN = Path(sys.executable).parent
TRL_VENV = ROOT / "bench" / ".venv-trl112"
TRL_VERSION = "1.12.0"
SHARED = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors")

OURS = """
import json, sys, torch
from pathlib import Path
from rlhf_tasks import ppo
from rlhf_tasks.config import load_params
spec = json.loads(Path(sys.argv[1]).read_text())
torch.set_num_threads(spec["threads"])
params = load_params("params.yaml", spec["overrides"])
result = ppo.train(params.ppo, policy=spec["sft_model"], reward_model=spec["reward_model"],
                   prompts=spec["prompts"], out_dir=Path(spec["out_dir"]))
print(json.dumps(result["timing"]))
"""

EVALUATE = """
import json, sys
from pathlib import Path
from rlhf_tasks import evaluate
from rlhf_tasks.config import load_params
from rlhf_tasks.stages import STAGES
policy_dir, out_dir = sys.argv[1:3]
params = load_params("params.yaml", [])
inputs = STAGES["evaluate"].io().inputs  # the evaluate stage's, but for the policy in policy_dir
result = evaluate.evaluate(params.evaluate, policy_dir=policy_dir, sft_dir=inputs["sft_model"],
    reward_dir=inputs["reward_model"], prompts=inputs["prompts_heldout"],
    pairs=inputs["preferences_heldout"], out_dir=Path(out_dir), model_cfg=params.model,
    judge_model=inputs["judge_model"])
print(json.dumps(result["metrics"]))
"""


def _trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {TRL_VENV} with trl=={TRL_VERSION} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pins = [
        line
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.split("==")[0].lower() in SHARED
    ]
    constraints = TRL_VENV / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "pip==25.3"], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}", "torch", "-c", str(constraints)], check=True)
    return python


def _last_json(proc: subprocess.CompletedProcess, what: str) -> dict:
    if proc.returncode:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _project(args: argparse.Namespace, scratch: Path, env: dict[str, str]) -> Path:
    if args.project:
        env["PYTHONPATH"] = str(ROOT)
        return args.project.resolve()
    work = scratch / "project"
    demo_copy(work, env)
    for stage in ("base_model", "validate", "sft", "reward"):
        print(f"rlhf stage {stage} ...", flush=True)
        subprocess.run([BIN / "rlhf", "stage", stage], cwd=work, env=env, check=True)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a project whose sft and reward stages ran")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs of runs")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    trl_python = _trl_venv()

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        project = _project(args, scratch, env)
        sys.path.insert(0, env["PYTHONPATH"])
        from rlhf_tasks import ppo
        from rlhf_tasks.config import load_params
        from rlhf_tasks.models import load_tokenizer
        from rlhf_tasks.stages import STAGES

        os.chdir(project)
        cfg = load_params("params.yaml", args.overrides).ppo
        inputs = STAGES["policy"].io(project).inputs
        tokenizer = load_tokenizer(str(inputs["sft_model"]), False, "sft model")
        ids = scratch / "prompt_ids.jsonl"
        rows, _ = ppo.load_prompts(inputs["prompts_rl"], tokenizer, cfg)
        ids.write_text("".join(json.dumps(r) + "\n" for r in rows))
        common = {
            "sft_model": str(inputs["sft_model"].resolve()),
            "reward_model": str(inputs["reward_model"].resolve()),
            "prompts": str(inputs["prompts_rl"].resolve()),
            "prompt_ids": str(ids),
            "threads": args.threads,
            "overrides": args.overrides,
            **cfg.model_dump(
                exclude={
                    "lora",
                    "resources",
                    "max_prompt_length",
                    "truncate_prompts",
                    "max_dropped_fraction",
                }
            ),
        }
        trainers = {
            # -P: the checkout's rlhf_tasks (PYTHONPATH), not the project directory's own copy
            "ours": [sys.executable, "-P", "-c", OURS],
            f"TRL {TRL_VERSION}": [str(trl_python), str(ROOT / "bench" / "ppo_trl112.py")],
        }
        runs: dict[str, list[dict]] = {name: [] for name in trainers}
        for pair in range(args.pairs):
            seed = cfg.seed + pair
            for name, command in trainers.items():
                out = scratch / f"{name.replace(' ', '-')}-{pair}"
                spec = scratch / f"{out.name}.json"
                overrides = [*args.overrides, f"ppo.seed={seed}"]
                spec.write_text(
                    json.dumps(
                        {**common, "seed": seed, "overrides": overrides, "out_dir": str(out)}
                    )
                )
                proc = subprocess.run(
                    [*command, str(spec)], cwd=project, env=env, capture_output=True, text=True
                )
                timing = _last_json(proc, name)
                evaluate = [sys.executable, "-P", "-c", EVALUATE]
                proc = subprocess.run(
                    [*evaluate, str(out / "model"), str(out / "evaluate")],
                    cwd=project,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                metrics = _last_json(proc, f"evaluate {name}")
                runs[name].append({"seed": seed, "timing": timing, "metrics": metrics})
                split = " ".join(
                    f"{k.removesuffix('_s')} {timing[k]:.1f}s"
                    for k in ("generation_s", "scoring_s", "optimisation_s")
                    if k in timing
                )
                print(
                    f"pair {pair + 1}, {name:>10s} (seed {seed}): "
                    f"{timing['episodes_per_s']:6.2f} episodes/s, loop {timing['loop_s']:.1f}s "
                    f"({split}); gold {metrics['gold/policy_score']:.3f}",
                    flush=True,
                )
    report(runs, cfg, args)


def report(runs: dict[str, list[dict]], cfg, args: argparse.Namespace) -> None:
    updates = cfg.total_episodes // cfg.rollout_batch_size
    print(
        f"\n{args.threads} CPU threads; {updates} updates of {cfg.rollout_batch_size} episodes, "
        f"minibatch {cfg.mini_batch_size}, {cfg.ppo_epochs} PPO epochs, "
        f"response length {cfg.response_length}; {args.pairs} interleaved pairs"
    )
    timing_rows = [
        ("episodes per second", "episodes_per_s", "{:.2f}"),
        ("training loop (s)", "loop_s", "{:.1f}"),
        ("  generation (s)", "generation_s", "{:.1f}"),
        ("  scoring: ref, value, reward passes (s)", "scoring_s", "{:.1f}"),
        ("  optimisation (s)", "optimisation_s", "{:.1f}"),
        ("  optimisation and other (s)", "optimisation_and_other_s", "{:.1f}"),
        ("model loading (s)", "setup_s", "{:.1f}"),
    ]
    metric_rows = [
        ("gold score, policy", "gold/policy_score", "{:.3f}"),
        ("gold score, SFT", "gold/sft_score", "{:.3f}"),
        ("gold win rate vs SFT", "gold/win_rate_vs_sft", "{:.3f}"),
        ("KL to SFT (nats/response)", "policy/kl_to_sft", "{:.2f}"),
        ("reward-model score, policy", "policy/reward_mean", "{:.3f}"),
    ]
    names = list(runs)
    for title, part, rows, summary in (
        ("median (range)", "timing", timing_rows, median_range),
        ("mean ± sd over the seeds", "metrics", metric_rows, mean_spread),
    ):
        print(f"{title:42s}" + "".join(f"{n:>24s}" for n in names))
        for label, key, fmt in rows:
            cells = [[r[part][key] for r in runs[n] if key in r[part]] for n in names]
            if any(cells):
                texts = [summary(c, fmt) if c else "-" for c in cells]
                print(f"{label:42s}" + "".join(f"{t:>24s}" for t in texts))
    print(json.dumps(runs))
    ours, trl = names
    ratios = [
        a["timing"]["episodes_per_s"] / b["timing"]["episodes_per_s"]
        for a, b in zip(runs[ours], runs[trl], strict=True)
    ]
    mid, low, high = statistics.median(ratios), min(ratios), max(ratios)
    print(f"ratio ours/TRL: median {mid:.2f} (range {low:.2f}-{high:.2f}) over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
