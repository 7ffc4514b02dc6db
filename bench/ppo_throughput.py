"""PPO throughput (episodes per second) of our trainer against batch size, response length and
model size; and the GPU figure: bf16 PPO on a random-init model of about 0.5B parameters.

    .venv/bin/python bench/ppo_throughput.py                 # CPU scaling tables
    .venv/bin/python bench/ppo_throughput.py --gpu           # one GPU, bf16, ~0.5B parameters
    .venv/bin/python bench/ppo_throughput.py --gpu --tiny    # the GPU script's path, tiny model

Every configuration trains ``rlhf_tasks.ppo.train`` for a few updates on random-init Llama
models (policy and reward model of the same size; the value model starts from the reward
model) built in a scratch directory, on the demo's RL prompts. Random models rarely stop early,
so responses run to the full length: these are figures for the compute, not for the demo's
learning. Prints episodes per second of the update loop (model loading excluded), response
tokens per second, and where the time went (generation, scoring passes, optimisation). Each
configuration first runs one warm-up update, not counted. Figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_tasks import base_model, demo, ppo  # noqa: E402
from rlhf_tasks.config import BaseModelConfig, ModelConfig, Params, PpoSection  # noqa: E402

# (label, hidden size, layers, heads, MLP size, vocabulary (None: the demo tokenizer's))
CPU_MODELS = [
    ("demo (64 x 2)", 64, 2, 4, 256, None),
    ("256 x 4", 256, 4, 4, 1024, None),
    ("512 x 8", 512, 8, 8, 2048, None),
]
GPU_MODEL = ("~0.5B (1024 x 32)", 1024, 32, 16, 2816, 32000)
TINY_GPU_MODEL = ("tiny (64 x 2)", 64, 2, 4, 256, 32000)
_RUNS = itertools.count()


def build(root: Path, spec: tuple, max_length: int) -> tuple[Path, Path, int]:
    """A random-init policy and reward model of ``spec``'s shape; returns (policy, reward,
    parameters of one model)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaForCausalLM

    label, hidden, layers, heads, mlp, vocab = spec
    out = root / label.split()[0].strip("~")
    cfg = BaseModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=mlp,
        max_length=max_length,
    )
    params = Params(base_model=cfg, model=ModelConfig(name_or_path=str(out / "policy")))
    base_model.build_in(params, out / "policy")
    config = AutoConfig.from_pretrained(out / "policy")
    if vocab:  # a realistic embedding size; the extra rows are never produced by the tokenizer
        config.vocab_size = vocab
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out / "policy", safe_serialization=True)
    config.num_labels = 1
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_config(config)
    reward.save_pretrained(out / "reward", safe_serialization=True)
    (out / "reward").joinpath("tokenizer.json").write_bytes(
        (out / "policy" / "tokenizer.json").read_bytes()
    )
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (out / "policy" / name).exists():
            (out / "reward" / name).write_bytes((out / "policy" / name).read_bytes())
    n_params = sum(p.numel() for p in reward.model.parameters())  # the policy's (tied head)
    return out / "policy", out / "reward", n_params


def measure(
    root: Path,
    policy: Path,
    reward: Path,
    prompts: Path,
    *,
    batch: int,
    response_length: int,
    updates: int,
    mixed_precision: str = "no",
) -> dict[str, float]:
    """One warm-up update (thread pools, allocator, kernels), then ``updates`` measured ones."""
    cfg = PpoSection(
        total_episodes=batch * updates,
        rollout_batch_size=batch,
        mini_batch_size=max(1, batch // 4),
        response_length=response_length,
        save_every=10**6,  # the final checkpoint only
        mixed_precision=mixed_precision,
    )
    warm = PpoSection(**{**cfg.model_dump(), "total_episodes": batch})
    out = root / f"run-{next(_RUNS)}"  # a fresh directory: nothing to resume
    ppo.train(warm, policy=policy, reward_model=reward, prompts=prompts, out_dir=out / "warm")
    result = ppo.train(cfg, policy=policy, reward_model=reward, prompts=prompts, out_dir=out)
    timing = result["timing"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    tokens = sum(r["val/response_length"] for r in history) * batch
    return {**timing, "response_tokens_per_s": tokens / timing["loop_s"]}


def _row(label: str, figures: dict[str, float]) -> str:
    return (
        f"{label:28s}{figures['episodes_per_s']:10.2f}{figures['response_tokens_per_s']:12.0f}"
        f"{figures.get('generation_s', 0):9.1f}{figures.get('scoring_s', 0):9.1f}"
        f"{figures.get('optimisation_s', 0):9.1f}"
    )


HEADER = f"{'':28s}{'episodes/s':>10s}{'tokens/s':>12s}{'gen s':>9s}{'score s':>9s}{'optim s':>9s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="bf16 on one GPU, ~0.5B parameters")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: a tiny model (a dry run)")
    parser.add_argument("--updates", type=int, default=3, help="updates measured per config")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = root / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in demo.make_prompts()))
        if args.gpu:
            if not torch.cuda.is_available() and not args.tiny:
                sys.exit("no GPU: run with --tiny for a dry run of this script on CPU")
            spec = TINY_GPU_MODEL if args.tiny else GPU_MODEL
            bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            policy, reward, n = build(root, spec, max_length=512)
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
            print(f"{device}; {spec[0]}: {n / 1e6:.0f}M parameters per model; bf16: {bf16}")
            print(HEADER)
            shapes = ((8, 16),) if args.tiny else ((64, 128), (128, 128), (64, 256))
            for batch, length in shapes:
                figures = measure(
                    root,
                    policy,
                    reward,
                    prompts,
                    batch=batch,
                    response_length=length,
                    updates=args.updates,
                    mixed_precision="bf16" if bf16 else "no",
                )
                print(_row(f"batch {batch}, length {length}", figures), flush=True)
                if torch.cuda.is_available():
                    peak = torch.cuda.max_memory_allocated() / 1024**3
                    print(f"{'':28s}peak GPU memory {peak:.1f} GiB", flush=True)
            return

        print(f"{torch.get_num_threads()} CPU threads; {args.updates} updates per configuration")
        demo_model = build(root, CPU_MODELS[0], max_length=128)
        print(f"\nbatch size (demo model, response length 40)\n{HEADER}")
        for batch in (16, 32, 64, 128):
            figures = measure(
                root,
                *demo_model[:2],
                prompts,
                batch=batch,
                response_length=40,
                updates=args.updates,
            )
            print(_row(f"batch {batch}", figures), flush=True)
        print(f"\nresponse length (demo model, batch 64)\n{HEADER}")
        for length in (20, 40, 80):
            figures = measure(
                root,
                *demo_model[:2],
                prompts,
                batch=64,
                response_length=length,
                updates=args.updates,
            )
            print(_row(f"length {length}", figures), flush=True)
        print(f"\nmodel size (batch 64, response length 40)\n{HEADER}")
        for spec in CPU_MODELS:
            policy, reward, n = (
                demo_model if spec == CPU_MODELS[0] else build(root, spec, max_length=128)
            )
            figures = measure(
                root, policy, reward, prompts, batch=64, response_length=40, updates=args.updates
            )
            print(_row(f"{spec[0]}, {n / 1e6:.1f}M", figures), flush=True)


if __name__ == "__main__":
    main()
