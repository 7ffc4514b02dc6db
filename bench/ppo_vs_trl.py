"""Our PPO against TRL 1.12.0's PPOTrainer, side by side on the demo.

    .venv/bin/python bench/ppo_vs_trl.py [--project DIR] [--threads N] [-S ppo.key=value ...]

The same SFT model, reward model (also each value model's start), RL prompts, rollout batch,
minibatch, PPO epochs, response length, number of updates, hyperparameters (params.yaml's `ppo`
section and `-S` overrides) and CPU threads, each trainer in a fresh process, one after the
other. TRL 1.12.0 runs in its own virtual environment, ``bench/.venv-trl112`` (created on first
use: TRL 1.12.0 with the project's locked torch, transformers, accelerate and datasets, so the
libraries under both trainers are the same); ``bench/ppo_trl112.py`` drives it.

Without ``--project``, a scratch copy of the repository gets the demo data and trains the
``base_model``, ``validate``, ``sft`` and ``reward`` stages first (a few minutes).

Prints, for each trainer: episodes per second of the training loop (model loading excluded),
where the loop's time went, and the evaluate stage's figures for its policy on the held-out
prompts (gold score, gold win rate against SFT, KL to SFT); then the throughput ratio. Figures
only; asserts nothing. Differences that remain: TRL trains policy and value with one optimiser
(ours: one each, same learning rate by default), TRL's Adam eps is 1e-8 (ours 1e-5), ours writes
its resumable checkpoints (every ``ppo.save_every`` updates) and TRL saves none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from demo_copy import ROOT, demo_copy

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
policy_dir, out_dir = sys.argv[1:3]
params = load_params("params.yaml", [])
result = evaluate.evaluate(params.evaluate, policy_dir=policy_dir, sft_dir="artifacts/sft/model",
    reward_dir="artifacts/reward/model", prompts=evaluate.PROMPTS, pairs=evaluate.PAIRS,
    out_dir=Path(out_dir))
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
        runs: dict[str, dict] = {}
        for name, command in (
            ("ours", [sys.executable, "-c", OURS]),
            (f"TRL {TRL_VERSION}", [str(trl_python), str(ROOT / "bench" / "ppo_trl112.py")]),
        ):
            out = scratch / name.replace(" ", "-")
            spec = scratch / f"{out.name}.json"
            spec.write_text(json.dumps({**common, "out_dir": str(out)}))
            print(f"training: {name} ...", flush=True)
            proc = subprocess.run(
                [*command, str(spec)], cwd=project, env=env, capture_output=True, text=True
            )
            timing = _last_json(proc, name)
            print(f"evaluating: {name} ...", flush=True)
            proc = subprocess.run(
                [sys.executable, "-c", EVALUATE, str(out / "model"), str(out / "evaluate")],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
            )
            runs[name] = {"timing": timing, "metrics": _last_json(proc, f"evaluate {name}")}

    updates = cfg.total_episodes // cfg.rollout_batch_size
    print(
        f"\n{args.threads} CPU threads; {updates} updates of {cfg.rollout_batch_size} episodes, "
        f"minibatch {cfg.mini_batch_size}, {cfg.ppo_epochs} PPO epochs, "
        f"response length {cfg.response_length}"
    )
    rows = [
        ("episodes per second", "timing", "episodes_per_s", "{:.2f}"),
        ("training loop (s)", "timing", "loop_s", "{:.1f}"),
        ("  generation (s)", "timing", "generation_s", "{:.1f}"),
        ("  scoring: ref, value, reward passes (s)", "timing", "scoring_s", "{:.1f}"),
        ("  optimisation (s)", "timing", "optimisation_s", "{:.1f}"),
        ("  other (s)", "timing", "other_s", "{:.1f}"),
        ("  optimisation and other (s)", "timing", "optimisation_and_other_s", "{:.1f}"),
        ("model loading (s)", "timing", "setup_s", "{:.1f}"),
        ("gold score, policy", "metrics", "gold/policy_score", "{:.3f}"),
        ("gold score, SFT", "metrics", "gold/sft_score", "{:.3f}"),
        ("gold win rate vs SFT", "metrics", "gold/win_rate_vs_sft", "{:.3f}"),
        ("KL to SFT (nats/response)", "metrics", "policy/kl_to_sft", "{:.2f}"),
        ("reward-model score, policy", "metrics", "policy/reward_mean", "{:.3f}"),
    ]
    names = list(runs)
    print(f"{'':42s}" + "".join(f"{n:>14s}" for n in names))
    for label, part, key, fmt in rows:
        cells = [runs[n][part].get(key) for n in names]
        if all(c is None for c in cells):
            continue
        texts = [fmt.format(c) if c is not None else "-" for c in cells]
        print(f"{label:42s}" + "".join(f"{t:>14s}" for t in texts))
    ours, trl = (runs[n]["timing"]["episodes_per_s"] for n in names)
    print(f"\nthroughput, ours / TRL {TRL_VERSION}: {ours / trl:.2f}x (goal: at least 1.5x)")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
