"""Stage ``policy``: the RLHF step proper, from the SFT model to the policy.

    rlhf stage policy [-S policy.algorithm=grpo] [-S ppo.kl_coef=0.1]

``policy.algorithm`` picks the trainer; each reads its own params section:

    ppo    this project's PPO (rlhf_tasks/ppo/) against the reward model, with a per-token KL
           penalty to the SFT model                                            section ``ppo``
    rloo   TRL's RLOOTrainer, the reward model as reward function               section ``rloo``
    grpo   TRL's GRPOTrainer, the reward model as reward function               section ``grpo``
    dpo    TRL's DPOTrainer on the preference pairs (no reward model)          section ``dpo``

All start from the SFT model (``artifacts/sft/model``), which is also the reference of their KL
term, and sample from the validated RL prompts (DPO trains on the validated preference pairs).
Writes, under ``artifacts/policy/``:

    model/          the policy, a standard HF model directory (a LoRA adapter merged)
    metrics.json    the final training metrics, under TRL's names (DVC metrics)
    history.jsonl   the metrics over training, one row per PPO update or TRL logging step
    run.json        the algorithm, runtime, the step a run resumed from
    checkpoints/    while it trains; a killed run resumes from the last one
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlhf_tasks import launch, reward
from rlhf_tasks.config import Params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.locations import StageIO
from rlhf_tasks.models import load_tokenizer, model_kwargs
from rlhf_tasks.rows import RowCounts
from rlhf_tasks.training import (
    fingerprint,
    fit,
    lora_config,
    read_jsonl,
    trainer_config,
    write_json,
)

# TRL's log keys for what PPO logs as objective/scores and objective/kl (for history.jsonl).
_TRL_KEYS = {"reward": "objective/scores", "kl": "objective/kl", "rewards/chosen": "dpo/chosen"}


def _require(path: Path, stage: str) -> str:
    if not (path / "config.json").exists():
        raise ConfigError(
            f"stage policy needs the {stage} model in {path}; run `rlhf stage {stage}` "
            f"(or `dvc repro {stage}`) first"
        )
    return str(path)


def run(params: Params, io: StageIO) -> dict[str, Any]:
    """The ``policy`` stage with ``policy.algorithm``; return locations and metrics."""
    algorithm = params.policy.algorithm
    started = time.perf_counter()
    policy = _require(io.inputs["sft_model"], "sft")
    reward_model = None if algorithm == "dpo" else _require(io.inputs["reward_model"], "reward")
    data = io.inputs["preferences_train" if algorithm == "dpo" else "prompts_rl"]
    read_jsonl(data, "policy")  # a clear error when the gate has not run
    section = getattr(params, algorithm)
    run_id = fingerprint(
        inputs=[str(data), policy, *([reward_model] if reward_model else [])],
        stage="policy",
        algorithm=algorithm,
        section=section.model_dump(),
        model=params.model.model_dump(),
    )
    if algorithm == "ppo":
        from rlhf_tasks import ppo  # torch: imported when a stage trains, not with the stage list

        def on_update(row: dict[str, float]) -> None:
            io.log_step(row, int(row["update"]))
            io.progress(row["episode"] / section.total_episodes)

        result = ppo.train(
            section,
            policy=policy,
            reward_model=reward_model,
            prompts=data,
            out_dir=io.workdir,
            run_id=run_id,
            model_cfg=params.model,
            on_update=on_update,
        )
        metrics, resumed = result["metrics"], result["resumed_from_update"]
        processes = result["num_processes"]
        profile = {f"ppo/time/{k}": round(v, 3) for k, v in result["timing"].items()}
    else:
        metrics, resumed, processes = _train_trl(
            params, algorithm, policy, reward_model, data, io, run_id
        )
        profile = {}
    timing = {
        "policy/algorithm": algorithm,
        "policy/train_runtime_s": round(time.perf_counter() - started, 2),
        "policy/resumed_from": resumed,
        "policy/num_processes": processes,
        **profile,  # PPO: episodes per second, and where the time went
    }
    if launch.is_main():  # one writer when several processes train
        write_json(io.workdir / "run.json", timing)
    return {
        "outputs": {role: str(path) for role, path in io.outputs.items()},
        "metrics": {**metrics, **timing},
    }


def _train_trl(
    params: Params,
    algorithm: str,
    policy: str,
    reward_model: str | None,
    data: Path,
    io: StageIO,
    run_id: str,
) -> tuple[dict[str, float], int, int]:
    """RLOO, GRPO or DPO through TRL, from the SFT model; saves a plain model directory."""
    import trl
    from datasets import Dataset

    section = getattr(params, algorithm)
    name = {"rloo": "RLOO", "grpo": "GRPO", "dpo": "DPO"}[algorithm]
    trust = params.model.trust_remote_code
    args = trainer_config(
        getattr(trl, f"{name}Config"),
        algorithm,
        section.args,
        output_dir=io.checkpoints,
        seed=section.seed,
        model=params.model,
    )
    tokenizer = load_tokenizer(policy, trust, "policy")
    rows = read_jsonl(data, "policy")
    extra: dict[str, Any] = {}
    if algorithm == "dpo":
        dataset = Dataset.from_list(reward.conversational(rows, use_margin=False))
    else:
        from transformers import AutoModelForSequenceClassification

        dataset = Dataset.from_list([{"prompt": prompt_messages(r["prompt"])} for r in rows])
        scorer = AutoModelForSequenceClassification.from_pretrained(
            reward_model, **model_kwargs(params.model)
        )
        extra = {
            "reward_funcs": scorer,
            "reward_processing_classes": load_tokenizer(reward_model, trust, "reward model"),
        }
    trainer = getattr(trl, f"{name}Trainer")(
        model=policy,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(section.lora, "CAUSAL_LM"),
        **extra,
    )
    # DPO drops the pairs that max_length / max_prompt_length truncate away entirely.
    counts = RowCounts(
        "policy",
        algorithm,
        read=len(rows),
        kept=len(trainer.train_dataset),
        limit=f"{algorithm}.args.max_length = {getattr(args, 'max_length', None)} tokens",
    )
    print(counts.summary())
    counts.check(section.max_dropped_fraction)
    _, start = fit(trainer, io, run_id)

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    history = []
    for entry in logs:
        row = {_TRL_KEYS.get(k, f"{algorithm}/{k}"): v for k, v in entry.items() if k != "step"}
        row["update"] = entry["step"]
        row["episode"] = entry["step"] * args.per_device_train_batch_size
        history.append(row)
    metrics = {k: round(float(v), 6) for k, v in (history[-1] if history else {}).items()}
    metrics.pop("update", None)
    metrics.pop("episode", None)
    metrics |= counts.metrics()
    if trainer.is_world_process_zero():
        with io.outputs["history"].open("w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in history)
        write_json(io.outputs["metrics"], metrics)
    trainer.accelerator.wait_for_everyone()
    return metrics, start, trainer.accelerator.num_processes
