"""TRL 1.12.0's PPOTrainer (``trl.experimental.ppo``, the last TRL release with PPO) on the demo.

    <trl-venv>/bin/python bench/ppo_trl112.py SPEC.json

Run by ``bench/ppo_vs_trl.py`` inside its own virtual environment (TRL 1.12.0 beside the
project's torch, transformers, accelerate and datasets versions), so it imports nothing of the
project. SPEC.json (written by ppo_vs_trl.py) names the SFT model, the reward model, the
tokenized prompts and the PPO settings; the trained policy is saved to ``spec["out_dir"]/model``
and one JSON line of figures is printed last: episodes per second of the training loop and where
its time went (generation; scoring = the rollout's reference, value and reward passes;
optimisation and the rest = what remains of the loop).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo


class Clock:
    """Seconds spent inside the wrapped functions, by phase; scoring counts only the rollout's
    passes (no grad), not the forward passes of the PPO epochs."""

    def __init__(self) -> None:
        self.seconds = {"generation": 0.0, "scoring": 0.0}

    def wrap(self, fn, phase: str, rollout_only: bool = False):
        def timed(*args, **kwargs):
            if rollout_only and torch.is_grad_enabled():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        return timed


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out_dir"])
    clock = Clock()
    trl_ppo.batch_generation = clock.wrap(trl_ppo.batch_generation, "generation")
    trl_ppo.forward = clock.wrap(trl_ppo.forward, "scoring", rollout_only=True)
    trl_ppo.get_reward = clock.wrap(trl_ppo.get_reward, "scoring", rollout_only=True)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["sft_model"])
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["sft_model"])
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["sft_model"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"])
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"])
    rows = [json.loads(line) for line in Path(spec["prompt_ids"]).read_text().splitlines()]
    dataset = Dataset.from_dict({"input_ids": rows})

    batch, mini = spec["rollout_batch_size"], spec["mini_batch_size"]
    config = PPOConfig(
        output_dir=str(out / "trainer"),
        seed=spec["seed"],
        total_episodes=spec["total_episodes"],
        # One optimiser step per minibatch, as ours: the whole rollout batch per device, no
        # gradient accumulation, batch / mini minibatches per epoch.
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // mini,
        local_rollout_forward_batch_size=batch,
        num_ppo_epochs=spec["ppo_epochs"],
        learning_rate=spec["learning_rate"],
        response_length=spec["response_length"],
        temperature=spec["temperature"],
        stop_token="eos",
        missing_eos_penalty=spec["missing_eos_penalty"],
        kl_coef=spec["kl_coef"],
        cliprange=spec["cliprange"],
        cliprange_value=spec["cliprange_value"],
        vf_coef=spec["vf_coef"],
        gamma=spec["gamma"],
        lam=spec["lam"],
        max_grad_norm=spec["max_grad_norm"],
        num_sample_generations=0,  # no sample tables during training (ours makes none either)
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
    )
    setup_s = time.perf_counter() - started
    loop_start = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - loop_start
    trainer.policy_model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")

    episodes = config.num_total_batches * config.batch_size
    phases = {f"{k}_s": v for k, v in clock.seconds.items()}
    print(
        json.dumps(
            {
                "episodes": episodes,
                "episodes_per_s": episodes / loop_s,
                "setup_s": setup_s,
                "loop_s": loop_s,
                **phases,
                "optimisation_and_other_s": loop_s - sum(clock.seconds.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
