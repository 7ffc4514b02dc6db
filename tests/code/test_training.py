"""The training stages' shared helpers: TRL args from params, chat messages, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trl import RewardConfig, SFTConfig

from rlhf_tasks.errors import ConfigError
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.training import checkpoint_to_resume, fingerprint, trainer_config


def _sft_config(tmp_path: Path, **args):
    return trainer_config(SFTConfig, "sft", args, output_dir=tmp_path / "ckpt", seed=7)


def test_args_reach_the_trl_config_with_what_the_stage_sets(tmp_path: Path):
    cfg = _sft_config(tmp_path, learning_rate=0.5, num_train_epochs=2, completion_only_loss=True)
    assert isinstance(cfg, SFTConfig)
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.completion_only_loss) == (0.5, 2, True)
    assert cfg.seed == 7
    assert cfg.output_dir == str(tmp_path / "ckpt")
    assert cfg.report_to == []  # "none"
    assert cfg.use_cpu == (not torch.cuda.is_available())


def test_a_float_written_as_1e_3_is_a_float(tmp_path: Path):
    # YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3"; so does -S sft.args.learning_rate=1e-3.
    assert _sft_config(tmp_path, learning_rate="1e-3").learning_rate == 0.001


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"learnig_rate": 0.1}, r"sft\.args\.learnig_rate: unknown key.*'learning_rate'"),
        ({"output_dir": "x"}, r"sft\.args\.output_dir: the stage chooses .*artifacts/sft/"),
        ({"report_to": "mlflow"}, r"sft\.args\.report_to"),
        ({"trust_remote_code": True}, r"sft\.args\.trust_remote_code: set model\."),
        ({"num_train_epochs": "three"}, r"sft\.args\.num_train_epochs: expected float"),
        ({"per_device_train_batch_size": 8.5}, r"per_device_train_batch_size: expected int"),
        ({"packing": "yes"}, r"sft\.args\.packing: expected bool, got 'yes'"),
        ({"lr_scheduler_type": "sideways"}, r"sft\.args: .*sideways"),
    ],
)
def test_bad_args_are_config_errors_naming_the_key(tmp_path: Path, args: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        _sft_config(tmp_path, **args)


def test_reward_args_are_checked_against_reward_config(tmp_path: Path):
    cfg = trainer_config(
        RewardConfig, "reward", {"center_rewards_coefficient": 0.01}, output_dir=tmp_path, seed=1
    )
    assert cfg.center_rewards_coefficient == 0.01
    with pytest.raises(ConfigError, match=r"reward\.args\.completion_only_loss: unknown key"):
        trainer_config(
            RewardConfig, "reward", {"completion_only_loss": True}, output_dir=tmp_path, seed=1
        )


def test_prompt_messages():
    assert prompt_messages("Tell me about dogs.") == [
        {"role": "user", "content": "Tell me about dogs."}
    ]
    # A multi-turn prompt, as rlhf_tasks.data renders it, becomes its turns again.
    transcript = "Human: Hi.\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me about cats."
    assert prompt_messages(transcript) == [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me about cats."},
    ]


def test_checkpoints_are_resumed_only_by_the_same_run(tmp_path: Path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    checkpoints = tmp_path / "checkpoints"
    run = fingerprint(inputs=[str(data)], args={"learning_rate": 0.1})

    assert checkpoint_to_resume(checkpoints, run) is None  # nothing yet
    _checkpoint(checkpoints, 5)
    _checkpoint(checkpoints, 10)
    assert checkpoint_to_resume(checkpoints, run) == str(checkpoints / "checkpoint-10")

    # Other params, or other data: the old checkpoints are removed, not resumed.
    other = fingerprint(inputs=[str(data)], args={"learning_rate": 0.2})
    assert other != run
    assert checkpoint_to_resume(checkpoints, other) is None
    assert not (checkpoints / "checkpoint-10").exists()
    _checkpoint(checkpoints, 3)
    data.write_text('{"prompt": "a", "completion": "c"}\n')
    assert fingerprint(inputs=[str(data)], args={"learning_rate": 0.2}) != other
    assert checkpoint_to_resume(checkpoints, run) is None
    assert list(checkpoints.iterdir()) == [checkpoints / "run_id"]


def _checkpoint(checkpoints: Path, step: int, state: str | None = None) -> Path:
    """A Trainer checkpoint directory; ``state``: its trainer_state.json as written (default:
    complete)."""
    path = checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state is None:
        state = json.dumps({"global_step": step})
    if state:
        (path / "trainer_state.json").write_text(state)
    return path


def test_only_a_complete_checkpoint_is_resumed(tmp_path: Path, capsys):
    """transformers writes trainer_state.json last: a checkpoint without it (or with a truncated
    one, or with another step's) was cut off while being written, and is removed, not resumed."""
    checkpoints = tmp_path / "checkpoints"
    assert checkpoint_to_resume(checkpoints, "run") is None
    _checkpoint(checkpoints, 2)
    _checkpoint(checkpoints, 4, state='{"global_st')  # truncated
    _checkpoint(checkpoints, 6, state="")  # no trainer_state.json
    _checkpoint(checkpoints, 8, state=json.dumps({"global_step": 7}))
    assert checkpoint_to_resume(checkpoints, "run") == str(checkpoints / "checkpoint-2")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "run_id"]
    out = capsys.readouterr().out
    assert f"{checkpoints / 'checkpoint-6'}: incomplete" in out
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in out


def test_trainer_still_saves_through_save_checkpoint():
    """guard_checkpoint_writes replaces a Trainer's private _save_checkpoint (transformers has no
    public hook around a checkpoint write): this fails loudly when transformers renames it,
    changes its arguments or stops calling it when it saves."""
    import inspect

    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == [
        "self",
        "model",
        "trial",
    ]
    assert "self._save_checkpoint(model, trial)" in inspect.getsource(Trainer)
