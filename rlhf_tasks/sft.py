"""Stage ``sft``: supervised fine-tuning of the base model with TRL's SFTTrainer.

    rlhf stage sft [-S sft.args.num_train_epochs=1] [-S sft.lora.enabled=true]

Reads ``model.name_or_path`` (the base model) and the demonstrations that passed the validation
gate (input ``sft_train``). Writes, under ``artifacts/sft/`` (the locations the registry gives):

    model/               a standard Hugging Face model directory with its tokenizer; with LoRA
                         the adapter is merged into the base weights first (a plain model)
    metrics.json         loss and token accuracy (DVC metrics: deterministic for given inputs)
    run.json             runtime, throughput, the step a run resumed from (vary between runs)
    trainer_state.json   the trainer's state with its log history (the loss curve)
    checkpoints/         while it trains; a killed run resumes from the last one, and the
                         runner removes them once the stage is complete and tracked

Each row becomes TRL's *conversational* prompt-completion form, ``prompt=[user message]``,
``completion=[assistant message]``, so that the tokenizer's chat template renders it as the
model will be prompted later (``<s>Human: ...\\n\\nAssistant: ...</s>``). Plain strings would be
concatenated with no separator and no turn markers. The loss is on the completion tokens only
(``completion_only_loss``; the prompt's labels are -100).
"""

from __future__ import annotations

from typing import Any

from rlhf_tasks.config import Params
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.locations import StageIO
from rlhf_tasks.models import load_tokenizer
from rlhf_tasks.rows import RowCounts, over
from rlhf_tasks.training import (
    chat_lengths,
    fingerprint,
    fit,
    last_logged,
    lora_config,
    read_jsonl,
    trainer_config,
    write_results,
)


def conversational(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated ``{prompt, completion}`` rows in TRL's conversational prompt-completion form."""
    return [
        {
            "prompt": prompt_messages(row["prompt"]),
            "completion": [{"role": "assistant", "content": row["completion"]}],
        }
        for row in rows
    ]


def build_trainer(params: Params, io: StageIO, rows: list[dict[str, Any]] | None = None) -> Any:
    """The SFTTrainer of this stage, its data (``rows``, by default its input ``sft_train``)
    tokenized (``trainer.train_dataset``)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, model = params.sft, params.model
    args = trainer_config(
        SFTConfig, "sft", cfg.args, output_dir=io.checkpoints, seed=cfg.seed, model=model
    )
    rows = read_jsonl(io.inputs["sft_train"], "sft") if rows is None else rows
    tokenizer = load_tokenizer(model.name_or_path, model.trust_remote_code, "model.name_or_path")
    return SFTTrainer(
        model=model.name_or_path,
        args=args,
        train_dataset=Dataset.from_list(conversational(rows)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "CAUSAL_LM"),
    )


def row_counts(trainer: Any, rows: list[dict[str, Any]]) -> RowCounts:
    """The rows SFTTrainer keeps: it truncates each sequence to ``max_length`` tokens and drops
    those left with no completion token."""
    limit = trainer.args.max_length
    full = chat_lengths(
        trainer.processing_class, [c["prompt"] + c["completion"] for c in conversational(rows)]
    )
    kept = len(trainer.train_dataset)
    return RowCounts(
        "sft",
        "sft",
        read=len(rows),
        kept=kept,
        truncated=max(0, over(full, limit) - (len(rows) - kept)),
        limit=f"sft.args.max_length = {limit} tokens",
    )


def run(params: Params, io: StageIO) -> dict[str, Any]:
    """The ``sft`` stage: train, save the (merged) model and the metrics; return locations and
    metrics."""
    cfg = params.sft
    rows = read_jsonl(io.inputs["sft_train"], "sft")
    trainer = build_trainer(params, io, rows)
    counts = row_counts(trainer, rows)
    print(counts.summary())
    counts.check(cfg.max_dropped_fraction)
    # Resume only a run of these params on these inputs (see training.checkpoint_to_resume).
    run_id = fingerprint(
        inputs=[str(io.inputs["sft_train"]), params.model.name_or_path],
        stage="sft",
        sft=cfg.model_dump(),
        model=params.model.model_dump(),
    )
    result, start = fit(trainer, io, run_id)
    state = trainer.state
    train_loss = round(result.training_loss, 6)
    final_loss = last_logged(state.log_history, "loss")
    # train_loss: the mean over the steps of this call (after a resume, the resumed steps only);
    # final_loss and mean_token_accuracy: over the last logging window (a run shorter than
    # logging_steps logs no loss: its final loss is its mean).
    metrics = {
        "sft/train_loss": train_loss,
        "sft/final_loss": train_loss if final_loss is None else final_loss,
        "sft/mean_token_accuracy": last_logged(state.log_history, "mean_token_accuracy"),
        "sft/steps": state.global_step,
        "sft/epochs": round(state.epoch or 0.0, 4),
        **counts.metrics(),
    }
    metrics = {key: value for key, value in metrics.items() if value is not None}
    timing = {
        "sft/train_runtime_s": round(result.metrics["train_runtime"], 2),
        "sft/train_samples_per_second": round(result.metrics["train_samples_per_second"], 2),
        "sft/resumed_from_step": start,
        "sft/num_processes": trainer.accelerator.num_processes,
    }
    write_results(trainer, io, metrics, timing)
    print(
        f"sft: {metrics['sft/steps']} steps in {timing['sft/train_runtime_s']} s, final loss "
        f"{metrics['sft/final_loss']:.3f}; model in {io.outputs['model']}"
    )
    return {
        "outputs": {"model": str(io.outputs["model"]), "metrics": str(io.outputs["metrics"])},
        "metrics": {**metrics, **timing},
    }
