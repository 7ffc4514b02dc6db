"""Stage sft on a few demo rows and a few steps: outputs, the training text, LoRA, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_validated
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from rlhf_tasks import sft
from rlhf_tasks.config import load_params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import STAGES, call

# A few steps of batch 8: seconds on a CPU. logging_steps=1 so every step is in the log history.
TINY = [
    "sft.args.max_steps=4",
    "sft.args.per_device_train_batch_size=8",
    "sft.args.logging_steps=1",
    "sft.args.save_steps=2",
    "sft.args.disable_tqdm=true",
]


def _params(*overrides: str):
    return load_params("params.yaml", [*TINY, *overrides])


@pytest.fixture(scope="module")
def tiny(module_project) -> tuple[Path, dict]:
    """One SFT run of ``TINY`` on 64 rows, for the tests that read what it leaves (the project
    directory and the stage's result)."""
    with module_project("sft") as root:
        write_validated(root, sft=64)
        return root, call("sft", _params())


@pytest.mark.slow
def test_run_writes_a_model_directory_and_metrics(tiny, base_model_dir: Path):
    project, result = tiny
    model_dir = project / "artifacts/sft/model"
    assert result["outputs"]["model"] == "artifacts/sft/model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert not (model_dir / "training_args.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in base.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and tokenizer.pad_token == "<pad>"

    metrics = json.loads((project / "artifacts/sft/metrics.json").read_text())
    assert metrics["sft/steps"] == 4
    assert metrics["sft/rows_read"] == metrics["sft/rows_kept"] == 64
    assert metrics["sft/rows_dropped"] == metrics["sft/rows_truncated"] == 0
    # The loss and accuracy reported are those of the training log, one entry per step here.
    log = json.loads((project / "artifacts/sft/trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 4
    assert metrics["sft/train_loss"] == pytest.approx(sum(losses) / 4, abs=1e-3)
    assert metrics["sft/final_loss"] == pytest.approx(losses[-1], abs=1e-6)
    accuracy = [e["mean_token_accuracy"] for e in log if "mean_token_accuracy" in e]
    assert metrics["sft/mean_token_accuracy"] == pytest.approx(accuracy[-1], abs=1e-6)
    # Run-dependent figures are kept out of the DVC metrics (dvc.lock must reproduce).
    assert not any("runtime" in key or "per_second" in key for key in metrics)
    timing = json.loads((project / "artifacts/sft/run.json").read_text())
    assert timing["sft/train_runtime_s"] > 0 and timing["sft/resumed_from_step"] == 0
    assert result["metrics"] == {**metrics, **timing}
    # Untracked (``call``), the stage keeps its last checkpoint: a run whose tracking failed
    # resumes at the end. The runner removes them once the stage is tracked (checked by
    # tests/reliability/test_killed_runs.py and test_outages.py).
    assert (project / "artifacts/sft/checkpoints/checkpoint-4/trainer_state.json").exists()


@pytest.mark.slow
def test_training_text_is_the_chat_template_with_loss_on_the_completion_only(
    project: Path, validated
):
    data_dir = validated(sft=8)
    row = json.loads((data_dir / "sft_train.jsonl").read_text().splitlines()[0])
    trainer = sft.build_trainer(_params(), STAGES["sft"].io())
    example = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    ids, labels = example["input_ids"], example["labels"]

    assert tokenizer.decode(ids) == (
        f"<s>Human: {row['prompt']}\n\nAssistant: {row['completion']}</s>"
    )
    # The prompt, as the model is prompted at generation time, carries no loss...
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [-100] * n
    # ...and every completion token, the end-of-sequence included, does.
    assert labels[n:] == ids[n:]
    assert tokenizer.decode(ids[n:]) == f" {row['completion']}</s>"


def test_unknown_sft_arg_is_a_config_error(project: Path, validated, rlhf):
    validated(sft=8)
    with pytest.raises(ConfigError, match=r"sft\.args\.learnin_rate.*'learning_rate'"):
        call("sft", _params("sft.args.learnin_rate=0.1"))

    code, _, err = rlhf("stage", "sft", "-S", "sft.args.learnin_rate=0.1")
    assert code == 2
    assert "sft.args.learnin_rate" in err and "Traceback" not in err
    assert not (project / "artifacts/sft/model").exists()


@pytest.mark.slow
def test_lora_saves_a_merged_plain_model(project: Path, validated, base_model_dir: Path):
    validated(sft=32)
    call("sft", _params("sft.lora.enabled=true", "sft.lora.r=4", "sft.args.learning_rate=1.0e-2"))

    model_dir = project / "artifacts/sft/model"
    names = {p.name for p in model_dir.iterdir()}
    assert "model.safetensors" in names
    assert not {"adapter_config.json", "adapter_model.safetensors"} & names
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    layer, base_layer = merged.model.layers[0], base.model.layers[0]
    # The adapter's update is in the linear weights; what LoRA does not train is unchanged.
    assert not torch.allclose(layer.self_attn.q_proj.weight, base_layer.self_attn.q_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)


class Killed(Exception):
    """Stands for the process being killed."""


def _kill_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    save = SFTTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        raise Killed

    monkeypatch.setattr(SFTTrainer, "_save_checkpoint", save_then_die)


def _count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    step = SFTTrainer.training_step

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", counted)
    return calls


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(
    project: Path, validated, monkeypatch: pytest.MonkeyPatch
):
    validated(sft=64)
    checkpoints = project / "artifacts/sft/checkpoints"
    with monkeypatch.context() as m:
        _kill_after_first_checkpoint(m)
        with pytest.raises(Killed):
            call("sft", _params())
    state = json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert not (project / "artifacts/sft/model").exists()

    steps = _count_steps(monkeypatch)
    result = call("sft", _params())
    assert result["metrics"]["sft/resumed_from_step"] == 2
    assert steps == [2, 3]  # only the steps after the checkpoint were trained
    final = json.loads((project / "artifacts/sft/trainer_state.json").read_text())
    assert final["global_step"] == 4
    # The log history spans the whole run: the first run's steps came with the checkpoint.
    assert [e["step"] for e in final["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert (project / "artifacts/sft/model/model.safetensors").exists()
    assert (checkpoints / "checkpoint-4/trainer_state.json").exists()  # kept until tracked


@pytest.mark.slow
def test_checkpoints_of_other_params_are_not_resumed(
    tiny, copy_project, monkeypatch: pytest.MonkeyPatch, capsys
):
    copy_project(tiny[0])  # holds the checkpoints of a run of TINY
    steps = _count_steps(monkeypatch)
    result = call("sft", _params("sft.args.learning_rate=1.0e-4"))
    assert result["metrics"]["sft/resumed_from_step"] == 0
    assert steps == [0, 1, 2, 3]
    assert "other params or inputs; starting anew" in capsys.readouterr().out
