"""Stage ``reward``: a Bradley–Terry reward model trained with TRL's RewardTrainer.

    rlhf stage reward [-S reward.init_from=base] [-S reward.use_margin=true]

A sequence-classification head with one output (the score) on top of the SFT model (by default,
``reward.init_from: sft``; ``base`` starts from ``model.name_or_path``, anything else is a path
or hub id), trained on the validated training pairs (input ``preferences_train``) with the loss
``-log sigmoid(r_chosen - r_rejected)`` (Ouyang et al. 2022, eq. 1), or with the annotators'
margins ``-log sigmoid(r_chosen - r_rejected - margin)`` (Touvron et al. 2023, Llama 2, eq. 2)
when ``reward.use_margin`` is on.

It is evaluated after training on the held-out pairs (``preferences_heldout``) by :func:`score`
over the saved model, the function later stages use to score responses: accuracy is the share of
held-out pairs where score(chosen) > score(rejected). Writes, under ``artifacts/reward/``:

    model/               a standard HF sequence-classification model directory with tokenizer
                         (a LoRA adapter is merged into the base weights first)
    metrics.json         held-out accuracy and mean margin, training loss (DVC metrics)
    run.json             runtime, throughput, the step a run resumed from (vary between runs)
    trainer_state.json   the trainer's state with its log history
    checkpoints/         while it trains; removed once the stage is complete and tracked

Pairs are formatted as the SFT data are: the prompt as a user message, each response as an
assistant message, rendered by the tokenizer's chat template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

from rlhf_tasks import serving
from rlhf_tasks.config import ModelConfig, Params
from rlhf_tasks.errors import ConfigError, TrainingFailed
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.locations import StageIO
from rlhf_tasks.models import load_tokenizer, model_kwargs
from rlhf_tasks.rows import RowCounts
from rlhf_tasks.training import (
    fingerprint,
    fit,
    last_logged,
    lora_config,
    read_jsonl,
    trainer_config,
    write_results,
)


def conversational(rows: list[dict[str, Any]], use_margin: bool) -> list[dict[str, Any]]:
    """Validated preference rows in TRL's conversational form (explicit prompt). With
    ``use_margin`` each pair keeps its margin (0 where the annotator gave none)."""
    out = []
    for row in rows:
        pair = {
            "prompt": prompt_messages(row["prompt"]),
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        if use_margin:
            pair["margin"] = float(row.get("margin") or 0.0)
        out.append(pair)
    return out


def init_location(params: Params, io: StageIO) -> str:
    """Where the reward model starts from: ``reward.init_from`` resolved to a path or hub id
    (``sft``: the SFT stage's model, input ``sft_model``)."""
    init = params.reward.init_from
    if init == "base":
        return params.model.name_or_path
    if init != "sft":
        return init
    location = io.inputs["sft_model"]
    if not (location / "config.json").exists():
        raise ConfigError(
            f"reward.init_from=sft: there is no SFT model in {location}; run `rlhf stage sft` "
            "(or `dvc repro sft`) first, or set reward.init_from to base or a model path"
        )
    return str(location)


def build_trainer(
    params: Params,
    io: StageIO,
    rows: list[dict[str, Any]] | None = None,
    seed: int | None = None,
) -> Any:
    """The RewardTrainer of this stage, its data (``rows``, by default the reward model's share
    of its input ``preferences_train``: ``judge_split``) tokenized (``trainer.train_dataset``);
    ``seed``: by default ``reward.seed``."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cfg = params.reward
    args = trainer_config(
        RewardConfig,
        "reward",
        cfg.args,
        output_dir=io.checkpoints,
        seed=cfg.seed if seed is None else seed,
        model=params.model,
    )
    init = init_location(params, io)
    if rows is None:
        rows, _ = judge_split(read_jsonl(io.inputs["preferences_train"], "reward"), params)
    tokenizer = load_tokenizer(init, params.model.trust_remote_code, "reward.init_from")
    return RewardTrainer(
        model=init,
        args=args,
        train_dataset=Dataset.from_list(conversational(rows, cfg.use_margin)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "SEQ_CLS"),
    )


def load_reward_model(
    location: str | Path, model_cfg: ModelConfig | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) of a saved reward model, in eval mode, on the GPU when there is one;
    loaded as ``model_cfg`` allows (``training.model_kwargs``)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    load = model_kwargs(model_cfg)
    tokenizer = load_tokenizer(str(location), load["trust_remote_code"], "reward model")
    model = AutoModelForSequenceClassification.from_pretrained(location, **load)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def score(
    model: Any, tokenizer: Any, prompts: list[str], responses: list[str], batch_size: int = 64
) -> list[float]:
    """The reward of each (prompt, response): [prompt as user message(s), response as assistant
    message], scored as ``serving.score`` does (the registered reward model's own code path)."""
    conversations = [
        [*prompt_messages(p), {"role": "assistant", "content": r}]
        for p, r in zip(prompts, responses, strict=True)
    ]
    return serving.score(model, tokenizer, conversations, batch_size)


# A reward model whose held-out scores all lie within this of each other scores every response
# the same: its Bradley-Terry loss is ln 2 and a policy has nothing to follow.
CONSTANT_SPREAD = 1e-4


def evaluate(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int) -> dict:
    """Held-out accuracy (share of pairs where score(chosen) > score(rejected)), mean margin,
    Bradley-Terry loss (mean ``-log sigmoid(margin)``; ln 2 = 0.693 for a constant scorer) and
    the spread of all the scores (max - min)."""
    prompts = [row["prompt"] for row in rows]
    chosen = score(model, tokenizer, prompts, [row["chosen"] for row in rows], batch_size)
    rejected = score(model, tokenizer, prompts, [row["rejected"] for row in rows], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    # -log sigmoid(m) = log(1 + e^-m), written to stay finite for large |m|.
    loss = [max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "loss": sum(loss) / len(loss),
        "spread": max(chosen + rejected) - min(chosen + rejected),
        "pairs": len(margins),
    }


def check_not_constant(held: dict[str, Any]) -> None:
    """Fail the stage when the reward model scores every held-out response the same."""
    if held["spread"] < CONSTANT_SPREAD:
        raise TrainingFailed(
            f"reward: the reward model gives every held-out response the same score (spread "
            f"{held['spread']:.2g}, held-out loss {held['loss']:.4f} = ln 2): it learned nothing "
            "a policy could follow, and nothing of it is registered. Check reward.args."
            "learning_rate (too high collapses the score head), that chosen and rejected "
            "differ in the data, or train longer"
        )


def judge_split(
    rows: list[dict[str, Any]], params: Params
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training pairs as (the reward model's, the judge's): ``judge.fraction`` of the
    prompts, with every pair of each, go to the judge (stage ``judge``), the rest to the reward
    model, so that the policy's judge never saw a pair the policy was trained against. Chosen by
    a hash of the prompt's text: the same prompt falls on the same side in every run and
    whatever the order of the rows. ``judge.fraction`` 0: every pair is the reward model's."""
    fraction = params.judge.fraction
    if not fraction:
        return rows, []
    mine: list[dict[str, Any]] = []
    judges: list[dict[str, Any]] = []
    for row in rows:
        digest = hashlib.sha256(row["prompt"].encode("utf-8")).digest()
        (judges if int.from_bytes(digest[:8], "big") < fraction * 2**64 else mine).append(row)
    return mine, judges


def train(
    stage: str,
    params: Params,
    io: StageIO,
    rows: list[dict[str, Any]],
    counts: RowCounts,
    seed: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stage ``stage`` (reward or judge): train a reward model on ``rows`` (``counts``: the rows
    read for it), save the (merged) model, score the held-out pairs with the saved model; return
    locations and metrics, the metrics under ``counts.stage``'s prefix (with ``extra``)."""
    cfg = params.reward
    name = counts.stage
    heldout = read_jsonl(io.inputs["preferences_heldout"], stage)
    trainer = build_trainer(params, io, rows, seed)
    # RewardTrainer drops the pairs whose chosen or rejected sequence is over max_length.
    counts = dataclasses.replace(
        counts,
        kept=len(trainer.train_dataset),
        limit=f"reward.args.max_length = {trainer.args.max_length} tokens",
    )
    print(counts.summary())
    counts.check(cfg.max_dropped_fraction)
    # Resume only a run of these params on these inputs (see training.checkpoint_to_resume).
    run_id = fingerprint(
        inputs=[str(io.inputs["preferences_train"]), init_location(params, io)],
        stage=stage,
        reward=cfg.model_dump(),
        judge=params.judge.model_dump(),
        model=params.model.model_dump(),
    )
    result, start = fit(trainer, io, run_id)
    model_dir = io.outputs["model"]
    model, tokenizer = load_reward_model(model_dir, params.model)
    held = evaluate(model, tokenizer, heldout, cfg.eval_batch_size)
    check_not_constant(held)
    state = trainer.state
    # train_loss: the mean over the steps of this call (after a resume, the resumed steps only);
    # train_accuracy: over the last logging window.
    metrics = {
        f"{name}/accuracy": round(held["accuracy"], 6),
        f"{name}/mean_margin": round(held["mean_margin"], 6),
        f"{name}/heldout_loss": round(held["loss"], 6),
        f"{name}/heldout_pairs": held["pairs"],
        f"{name}/train_loss": round(result.training_loss, 6),
        f"{name}/train_accuracy": last_logged(state.log_history, "accuracy"),
        f"{name}/steps": state.global_step,
        f"{name}/epochs": round(state.epoch or 0.0, 4),
        # Pairs longer than args.max_length are dropped by RewardTrainer.
        f"{name}/train_pairs": len(trainer.train_dataset),
        **counts.metrics(),
        **(extra or {}),
    }
    metrics = {key: value for key, value in metrics.items() if value is not None}
    timing = {
        f"{name}/train_runtime_s": round(result.metrics["train_runtime"], 2),
        f"{name}/train_samples_per_second": round(result.metrics["train_samples_per_second"], 2),
        f"{name}/resumed_from_step": start,
    }
    write_results(trainer, io, metrics, timing)
    print(
        f"{stage}: {metrics[f'{name}/steps']} steps in "
        f"{timing[f'{name}/train_runtime_s']} s; held-out accuracy "
        f"{metrics[f'{name}/accuracy']:.3f} on {held['pairs']} pairs, mean margin "
        f"{metrics[f'{name}/mean_margin']:.3f}; model in {model_dir}"
    )
    return {
        "outputs": {"model": str(model_dir), "metrics": str(io.outputs["metrics"])},
        "metrics": {**metrics, **timing},
    }


def run(params: Params, io: StageIO) -> dict[str, Any]:
    """The ``reward`` stage: the reward model on its share of the training pairs (all of them
    unless ``judge.fraction`` sets some aside for the judge)."""
    rows = read_jsonl(io.inputs["preferences_train"], "reward")
    mine, judges = judge_split(rows, params)
    counts = RowCounts(
        "reward_model",
        "reward",
        read=len(rows),
        kept=len(mine),
        set_aside=len(judges),
        set_aside_for=f"the judge (judge.fraction = {params.judge.fraction})",
    )
    return train("reward", params, io, mine, counts, params.reward.seed)
