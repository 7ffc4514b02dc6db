"""What the training stages share: TRL arguments from params, LoRA, chat messages, checkpoints
to resume from, and the outline of a stage that trains with one of TRL's trainers (``fit``, then
``write_results``), written once for ``sft``, ``reward`` and the policy's RLOO, GRPO and DPO.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_tasks.config import LoraSection, ModelConfig
from rlhf_tasks.errors import CheckpointError, ConfigError
from rlhf_tasks.models import model_kwargs

if TYPE_CHECKING:
    from rlhf_tasks.locations import StageIO

# TrainingArguments fields that the stage sets itself, and where the user sets them instead.
RESERVED_ARGS = {
    "output_dir": "the stage chooses its output directory (artifacts/<stage>/)",
    "seed": "set it as <stage>.seed",
    "trust_remote_code": "set model.trust_remote_code",
    "report_to": "experiment tracking is configured by the pipeline, not per stage",
    "resume_from_checkpoint": "the stage resumes from its own last checkpoint by itself",
}

# Lower bounds of TrainingArguments/TRL fields that neither checks itself (a negative learning
# rate fails only when the optimiser is built, after the stages before it have run): the key,
# the bound, and whether the bound itself is allowed. Checked on the keys the user sets.
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "learning_rate": (0, True),
    "num_train_epochs": (0, True),
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "weight_decay": (0, True),
    "adam_beta1": (0, True),
    "adam_beta2": (0, True),
    "adam_epsilon": (0, True),
    "max_grad_norm": (0, True),
    "logging_steps": (0, False),
    "save_steps": (0, False),
    "eval_steps": (0, False),
    "dataloader_num_workers": (0, True),
    "max_length": (1, True),
    "max_prompt_length": (1, True),
    "max_completion_length": (1, True),
    "beta": (0, True),
    "temperature": (0, False),
}
UPPER_BOUNDS: dict[str, float] = {"adam_beta1": 1, "adam_beta2": 1}  # exclusive


# -- TRL's config classes, from params --------------------------------------------------------


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """Check a scalar against a dataclass field's type; leave enums, dicts and lists to TRL."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(hint)) if union else {hint}
    if not allowed <= {bool, int, float, str, type(None)}:
        return value  # e.g. `IntervalStrategy | str`, `dict | str`: TrainingArguments checks them
    if value is None and type(None) in allowed:
        return value
    if isinstance(value, bool):  # an int to Python, not to a config
        ok = bool in allowed
    elif isinstance(value, int):
        ok = bool(allowed & {int, float})
    elif isinstance(value, float):
        ok = float in allowed
    elif isinstance(value, str) and str not in allowed and float in allowed:
        # YAML 1.1 reads 1e-3 (no dot) as a string, and so does -S sft.args.learning_rate=1e-3.
        try:
            return float(value)
        except ValueError:
            ok = False
    else:
        ok = isinstance(value, str) and str in allowed
    if not ok:
        names = " or ".join(sorted(t.__name__ for t in allowed))
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    return value


def _check_bounds(where: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or key not in LOWER_BOUNDS:
        return
    low, inclusive = LOWER_BOUNDS[key]
    if value < low or (value == low and not inclusive):
        raise ConfigError(f"{where}: must be {'>=' if inclusive else '>'} {low}, got {value!r}")
    if key in UPPER_BOUNDS and value >= UPPER_BOUNDS[key]:
        raise ConfigError(f"{where}: must be < {UPPER_BOUNDS[key]}, got {value!r}")


def _init_kwargs(section: str, value: Any, model: ModelConfig | None) -> dict[str, Any]:
    """``model_init_kwargs`` (what TRL passes to ``from_pretrained`` when it loads the model
    itself) with this project's loading rules; the user's own keys are kept. The weights train
    in fp32 unless the user sets ``dtype``: transformers would otherwise keep a bf16
    checkpoint's dtype, and bf16 master weights round most updates away at fine-tuning learning
    rates; ``args.bf16`` then computes in bf16 under autocast, as mixed precision does."""
    where = f"{section}.args.model_init_kwargs"
    if isinstance(value, str):  # TrainingArguments accepts a JSON string for dict fields
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    if not isinstance(value, dict | None):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    for key, param in {
        "trust_remote_code": "trust_remote_code",
        "use_safetensors": "allow_pickle",
    }.items():
        if key in (value or {}):
            raise ConfigError(f"{where}.{key}: set model.{param}")
    loading = model_kwargs(model)
    loading.pop("trust_remote_code")  # TRL takes it from the config's own trust_remote_code
    value = value or {}
    dtype = {} if {"dtype", "torch_dtype"} & set(value) else {"dtype": "float32"}
    return {**dtype, **value, **loading}


def trainer_config(
    cls: type,
    section: str,
    args: dict[str, Any],
    *,
    output_dir: Path,
    seed: int,
    model: ModelConfig | None = None,
    **stage: Any,
) -> Any:
    """``cls(**args)`` (``trl.SFTConfig``, ``trl.RewardConfig``, ...), every key checked first.

    An unknown key, a key the stage sets itself, a wrong scalar type or a value out of range (a
    negative learning rate) is a ConfigError naming ``<section>.args.<key>``. The model TRL
    loads is loaded as ``model`` says (``trust_remote_code``, ``allow_pickle``: see
    ``model_kwargs``); ``stage`` holds further values the stage sets.
    """
    import torch

    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    checked: dict[str, Any] = {}
    for key, value in args.items():
        where = f"{section}.args.{key}"
        if key in RESERVED_ARGS:
            raise ConfigError(f"{where}: {RESERVED_ARGS[key].replace('<stage>', section)}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key, not a field of trl.{cls.__name__}{hint}")
        checked[key] = _check_type(where, value, hints[key])
        _check_bounds(where, key, checked[key])
    # CPU when there is no CUDA device (the demo); the user may also ask for it on a GPU machine.
    checked["use_cpu"] = bool(checked.get("use_cpu")) or not torch.cuda.is_available()
    if "model_init_kwargs" in fields:
        checked["model_init_kwargs"] = _init_kwargs(
            section, checked.get("model_init_kwargs"), model
        )
    if "trust_remote_code" in fields:
        stage.setdefault("trust_remote_code", model_kwargs(model)["trust_remote_code"])
    try:
        return cls(
            output_dir=str(output_dir),
            seed=seed,
            # Per-step metrics go to the stage's MLflow run when the runner tracks it.
            report_to="mlflow" if _mlflow_run_active() else "none",
            **stage,
            **checked,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{section}.args: {exc}") from None


def lora_config(lora: LoraSection, task_type: str) -> Any:
    """A peft LoraConfig from params, or None when LoRA is off. ``task_type``: CAUSAL_LM or
    SEQ_CLS (peft then also trains and saves the ``score`` head in full)."""
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


# -- data -------------------------------------------------------------------------------------


def chat_lengths(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[int]:
    """Token count of each conversation as the chat template renders it (the whole sequence a
    trainer tokenizes, before any truncation)."""
    return [
        len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
        for c in conversations
    ]


def read_jsonl(path: Path, stage: str) -> list[dict[str, Any]]:
    """Rows of a validated data file (``artifacts/validate/data/``)."""
    if not path.exists():
        raise ConfigError(
            f"stage {stage} reads {path}, which does not exist: run the validation gate first "
            "(`rlhf stage validate` or `dvc repro validate`)"
        )
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# -- checkpoints ------------------------------------------------------------------------------


def fingerprint(*, inputs: list[str], **settings: Any) -> str:
    """A digest of what a run depends on: settings (JSON-able) and its input files or directories.

    Input files are hashed by content; files in a model directory by name, size and mtime (cheap
    for multi-GB weights, and a retrained model has a new mtime).
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for location in inputs:
        path = Path(location)
        if path.is_file():
            digest.update(path.read_bytes())
        elif path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                stat = f.stat()
                digest.update(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(location.encode())  # a hub id
    return digest.hexdigest()


def claim_checkpoints(checkpoints: Path, run_id: str) -> bool:
    """Make ``checkpoints`` the checkpoint directory of the run ``run_id``; True if it already
    was (its checkpoints may be resumed).

    Checkpoints of a run with other params or inputs (a killed run, then a change and a rerun)
    are removed rather than resumed: resuming them would silently train a mix of both.
    """
    stamp = checkpoints / "run_id"
    if stamp.exists() and stamp.read_text().strip() == run_id:
        return True
    if checkpoints.is_dir():
        if any(p.is_dir() for p in checkpoints.iterdir()):
            print(f"{checkpoints}: checkpoints of a run with other params or inputs; starting anew")
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    stamp.write_text(run_id + "\n")
    return False


def checkpoint_to_resume(checkpoints: Path, run_id: str, trainer: Any = None) -> str | None:
    """The last complete Trainer checkpoint in ``checkpoints`` if it belongs to this run
    (``run_id``); incomplete ones after it are removed. With ``trainer``, its checkpoint writes
    are guarded too (``guard_checkpoint_writes``)."""
    if trainer is not None:
        guard_checkpoint_writes(trainer, checkpoints)
    if not claim_checkpoints(checkpoints, run_id):
        return None
    last = last_complete_checkpoint(checkpoints, remove_incomplete=True)
    if last:
        print(f"resuming from {last}")
    return str(last) if last else None


# The file Trainer._save_checkpoint writes last, after the weights, optimizer, scheduler and RNG
# states (transformers 5.24): a checkpoint without it was cut off while it was being written.
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _complete_step(path: Path) -> int | None:
    """The global step of the Trainer checkpoint in ``path`` if it is complete, else None."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        return int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated, or not a state
        return None


def last_complete_checkpoint(checkpoints: Path, remove_incomplete: bool = False) -> Path | None:
    """The Trainer checkpoint of the highest step that is complete: its ``trainer_state.json``
    (written last) reads, and names the step of the directory. transformers' own
    ``get_last_checkpoint`` takes the highest ``checkpoint-N`` whatever it holds, so a run killed
    (or out of disk) while writing one would resume from half a checkpoint, or fail to.
    ``remove_incomplete``: remove the incomplete ones found after the last complete one."""
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (int(match.group(1)), path)
        for path in checkpoints.iterdir()
        if path.is_dir() and (match := _CHECKPOINT.fullmatch(path.name))
    )
    for step, path in reversed(found):
        if _complete_step(path) == step:
            return path
        if remove_incomplete:
            print(f"{path}: incomplete (the run stopped while writing it); removed")
            shutil.rmtree(path, ignore_errors=True)
    return None


def checkpoint_error(path: Path, exc: BaseException, previous: Path | None) -> CheckpointError:
    """The error of a checkpoint that could not be written: which, why, and what is left."""
    kept = (
        f"the previous checkpoint, {previous}, is intact and a rerun resumes from it"
        if previous
        else "there is no earlier checkpoint: a rerun starts the stage from the beginning"
    )
    return CheckpointError(
        f"could not write checkpoint {path}: {type(exc).__name__}: {exc}; {kept} once the cause "
        "is fixed"
    )


def guard_checkpoint_writes(trainer: Any, checkpoints: Path) -> None:
    """Make a Trainer checkpoint that cannot be written (a full disk: an OSError, or the
    RuntimeError torch.save raises for it) fail the stage with a CheckpointError naming the
    checkpoint, the cause and the previous checkpoint; what was written of it is removed. The
    older checkpoints are untouched: the Trainer rotates them out only after a complete save."""

    def save(model: Any, trial: Any) -> None:
        step = trainer.state.global_step
        path = checkpoints / f"checkpoint-{step}"
        try:
            type(trainer)._save_checkpoint(trainer, model, trial)
        except Exception as exc:
            if _complete_step(path) == step:
                raise  # the checkpoint was written; whatever failed after it is not about it
            if trainer.args.should_save:
                shutil.rmtree(path, ignore_errors=True)
            raise checkpoint_error(path, exc, last_complete_checkpoint(checkpoints)) from exc

    # A private method, on purpose: transformers (5.x) has no public hook around a checkpoint
    # write. Callbacks' on_save runs only after a save succeeded, and nothing is called when one
    # fails, so the partial directory could not be told from a complete one. Only this
    # instance's method is replaced (Trainer calls self._save_checkpoint(model, trial));
    # tests/code/test_training.py::test_trainer_still_saves_through_save_checkpoint fails when
    # transformers renames it or stops calling it.
    trainer._save_checkpoint = save


def resumed_step(checkpoint: str | None) -> int:
    """The global step of the checkpoint a run resumes from (0: none). Read it before training:
    the Trainer rotates that checkpoint out once it has saved newer ones."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / TRAINER_STATE).read_text())["global_step"])


# -- outputs ----------------------------------------------------------------------------------


def save_plain_model(trainer: Any, out_dir: Path) -> None:
    """Save the trained model as a standard HF model directory (config, safetensors, tokenizer).

    A LoRA adapter is merged into the base weights first, so that later stages load a plain
    model. Written with ``save_pretrained`` rather than ``Trainer.save_model``, which adds
    ``training_args.bin`` (a pickle) to the directory.
    """
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        model = model.merge_and_unload()
    if not trainer.accelerator.is_main_process:
        return
    shutil.rmtree(out_dir, ignore_errors=True)  # no stale files from an earlier run
    model.config.use_cache = True  # training turns the KV cache off; generation wants it
    model.save_pretrained(out_dir, safe_serialization=True)
    trainer.processing_class.save_pretrained(out_dir)


def _mlflow_run_active() -> bool:
    """Whether this process has an active MLflow run (the runner tracks the stage). Read from
    sys.modules: a stage that nothing tracks never imports MLflow for it."""
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and mlflow.active_run() is not None


def fit(trainer: Any, io: StageIO, run_id: str) -> tuple[Any, int]:
    """The outline every stage that trains with one of TRL's trainers shares: resume this run's
    last complete checkpoint (``run_id``: a digest of its params and inputs, so that a changed
    run starts anew), train, save the model as a plain directory in ``io.outputs["model"]``.
    Returns TRL's ``TrainOutput`` and the step it resumed from (0: none). The runner removes
    the checkpoints once the stage is complete and tracked."""
    resume = checkpoint_to_resume(io.checkpoints, run_id, trainer)
    start = resumed_step(resume)  # before training: the Trainer rotates that checkpoint out
    result = trainer.train(resume_from_checkpoint=resume)
    save_plain_model(trainer, io.outputs["model"])
    return result, start


def write_results(
    trainer: Any, io: StageIO, metrics: dict[str, Any], timing: dict[str, Any]
) -> None:
    """What a TRL stage leaves besides its model, written by one process: ``metrics`` (DVC
    metrics: deterministic for given inputs) to ``io.outputs["metrics"]``; ``timing`` (runtime,
    throughput, the step it resumed from: they vary between runs) to ``run.json`` and the
    trainer's state with its log history to ``trainer_state.json`` in the stage's workdir."""
    if trainer.is_world_process_zero():
        write_json(io.outputs["metrics"], metrics)
        write_json(io.workdir / "run.json", timing)
        trainer.state.save_to_json(str(io.workdir / "trainer_state.json"))
    trainer.accelerator.wait_for_everyone()


def last_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    """The last value of ``key`` that the trainer logged (a mean over the last logging window);
    None if it logged none (a run shorter than ``logging_steps``)."""
    values = [entry[key] for entry in log_history if key in entry]
    return round(float(values[-1]), 6) if values else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
