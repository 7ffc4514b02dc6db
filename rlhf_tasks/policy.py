"""Stage ``policy``: the RLHF step proper, from the SFT model to the policy.

    rlhf stage policy [-S policy.algorithm=grpo] [-S ppo.kl_coef=0.1]

``policy.algorithm`` picks the trainer; each reads its own params section:

    ppo    this project's PPO (rlhf_tasks/ppo.py) against the reward model, with a per-token KL
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

from rlhf_tasks import launch, reward, sft, tracking, validate
from rlhf_tasks.config import Params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.training import (
    checkpoint_to_resume,
    discard_checkpoints,
    fingerprint,
    load_tokenizer,
    lora_config,
    model_kwargs,
    prompt_messages,
    read_jsonl,
    remove_checkpoints,
    resumed_step,
    save_plain_model,
    trainer_config,
    write_json,
)

DEFAULT_OUT = Path("artifacts/policy")
PROMPTS = validate.DEFAULT_OUT / "data" / "prompts_rl.jsonl"
SFT_MODEL = sft.DEFAULT_OUT / "model"
REWARD_MODEL = reward.DEFAULT_OUT / "model"

# TRL's log keys for what PPO logs as objective/scores and objective/kl (for history.jsonl).
_TRL_KEYS = {"reward": "objective/scores", "kl": "objective/kl", "rewards/chosen": "dpo/chosen"}


def _require(path: Path, stage: str) -> str:
    if not (path / "config.json").exists():
        raise ConfigError(
            f"stage policy needs the {stage} model in {path}; run `rlhf stage {stage}` "
            f"(or `dvc repro {stage}`) first"
        )
    return str(path)


def run(params: Params, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    """The ``policy`` stage with ``policy.algorithm``; return locations and metrics."""
    algorithm = params.policy.algorithm
    started = time.perf_counter()
    policy = _require(SFT_MODEL, "sft")
    reward_model = None if algorithm == "dpo" else _require(REWARD_MODEL, "reward")
    data = (
        validate.DEFAULT_OUT / "data" / "preferences_train.jsonl" if algorithm == "dpo" else PROMPTS
    )
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

        result = ppo.train(
            section,
            policy=policy,
            reward_model=reward_model,
            prompts=data,
            out_dir=out_dir,
            run_id=run_id,
            model_cfg=params.model,
            on_update=lambda row: _on_update(row, section.total_episodes),
        )
        if launch.is_main():  # every process is done with them: ppo.train waited for all
            discard_checkpoints(out_dir / "checkpoints")
        metrics, resumed = result["metrics"], result["resumed_from_update"]
        processes = result["num_processes"]
        profile = {f"ppo/time/{k}": round(v, 3) for k, v in result["timing"].items()}
    else:
        metrics, resumed, processes = _train_trl(
            params, algorithm, policy, reward_model, data, out_dir, run_id
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
        write_json(out_dir / "run.json", timing)
    return {
        "outputs": {
            "model": str(out_dir / "model"),
            "metrics": str(out_dir / "metrics.json"),
            "history": str(out_dir / "history.jsonl"),
        },
        "metrics": {**metrics, **timing},
    }


def _on_update(row: dict[str, float], total_episodes: int) -> None:
    tracking.log_step(row, step=int(row["update"]))
    tracking.report_progress("policy", row["episode"] / total_episodes)


def _train_trl(
    params: Params,
    algorithm: str,
    policy: str,
    reward_model: str | None,
    data: Path,
    out_dir: Path,
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
        output_dir=out_dir / "checkpoints",
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
    resume = checkpoint_to_resume(out_dir / "checkpoints", run_id, trainer)
    start = resumed_step(resume)  # before training: the Trainer rotates that checkpoint out
    trainer.train(resume_from_checkpoint=resume)
    save_plain_model(trainer, out_dir / "model")

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
    if trainer.is_world_process_zero():
        with (out_dir / "history.jsonl").open("w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in history)
        write_json(out_dir / "metrics.json", metrics)
    remove_checkpoints(trainer, out_dir / "checkpoints")
    return metrics, start, trainer.accelerator.num_processes
