"""A bad config is a clear error before any work starts: `rlhf run` and the Prefect flow check
every training stage's TRL arguments and every model the run starts from (rlhf_tasks/preflight.py)
before the first stage, so a mistake costs seconds, not the stages that ran before the one that
reads it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, env
from mlflow import MlflowClient
from trl import DPOConfig, SFTConfig

from rlhf_tasks import preflight
from rlhf_tasks.config import load_params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.training import trainer_config


def _check(project: Path, *overrides: str) -> None:
    preflight.check(load_params(project / "params.yaml", list(overrides)))


def _nothing_ran(project: Path) -> None:
    assert not (project / "artifacts").exists()
    assert not (project / "mlruns").exists()
    store = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")  # the empty store
    assert [e.name for e in store.search_experiments()] == ["Default"]


# -- TRL's arguments, for every training stage of the run ----------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "section"),
    [("ppo", "sft"), ("ppo", "reward"), ("rloo", "rloo"), ("grpo", "grpo"), ("dpo", "dpo")],
)
def test_a_negative_learning_rate_is_refused_up_front(project: Path, algorithm: str, section: str):
    with pytest.raises(ConfigError) as exc:
        _check(project, f"policy.algorithm={algorithm}", f"{section}.args.learning_rate=-0.1")
    assert str(exc.value) == f"{section}.args.learning_rate: must be >= 0, got -0.1"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "grpo.args.num_generationz=4",
            r"grpo\.args\.num_generationz: unknown.*'num_generations'",
        ),
        ("grpo.args.beta=high", r"grpo\.args\.beta: expected float, got 'high'"),
        ("grpo.args.num_generations=1", r"grpo\.args: .*at least 2 generations"),  # TRL's own
        ("grpo.args.temperature=0", r"grpo\.args\.temperature: must be > 0"),
    ],
)
def test_the_chosen_algorithms_args_are_checked(project: Path, override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        _check(project, "policy.algorithm=grpo", override)


def test_a_section_the_run_does_not_use_is_not_held_against_it(project: Path):
    _check(project, "policy.algorithm=ppo", "grpo.args.learning_rate=-1")  # grpo does not run


def test_every_mistake_is_reported_at_once(project: Path):
    with pytest.raises(ConfigError) as exc:
        _check(
            project,
            "sft.args.learning_rate=-1",
            "reward.args.lerning_rate=0.1",
            "model.name_or_path=/no/such/model",
        )
    lines = str(exc.value).splitlines()
    assert lines[0] == "sft.args.learning_rate: must be >= 0, got -1"
    assert lines[1].startswith("reward.args.lerning_rate: unknown key")
    assert lines[2] == "model.name_or_path='/no/such/model': no such directory"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size: must be >= 1, got 0"),
        ({"num_train_epochs": -1}, r"num_train_epochs: must be >= 0"),
        ({"adam_beta2": 1.0}, r"adam_beta2: must be < 1"),
        ({"weight_decay": -0.01}, r"weight_decay: must be >= 0"),
        ({"save_steps": 0}, r"save_steps: must be > 0"),
        ({"max_length": 0}, r"max_length: must be >= 1"),
    ],
)
def test_values_out_of_range_are_config_errors_naming_the_key(
    tmp_path: Path, args: dict, message: str
):
    with pytest.raises(ConfigError, match=r"sft\.args\." + message):
        trainer_config(SFTConfig, "sft", args, output_dir=tmp_path, seed=0)


def test_values_at_their_bounds_are_accepted(tmp_path: Path):
    cfg = trainer_config(
        DPOConfig,
        "dpo",
        {"learning_rate": 0.0, "beta": 0.0, "num_train_epochs": 0.5, "max_grad_norm": 0.0},
        output_dir=tmp_path,
        seed=0,
    )
    assert (cfg.learning_rate, cfg.beta, cfg.num_train_epochs) == (0.0, 0.0, 0.5)


def test_arguments_found_valid_are_not_built_again_until_they_change(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    """Building TRL's configs imports TRL (seconds an `rlhf run` of cached stages would not
    spend otherwise): arguments found valid are remembered; any change is checked again."""
    built = []
    real = preflight.trainer_configs
    monkeypatch.setattr(preflight, "trainer_configs", lambda p: built.append(p) or real(p))
    _check(project)
    assert len(built) == 1 and (project / preflight.CHECKED_ARGS).is_file()
    _check(project)
    assert len(built) == 1  # the same arguments: not built again
    with pytest.raises(ConfigError, match=r"^sft\.args\.learning_rate: must be >= 0"):
        _check(project, "sft.args.learning_rate=-1")
    with pytest.raises(ConfigError, match=r"^dpo\.args\.beta: must be >= 0"):
        _check(project, "policy.algorithm=dpo", "dpo.args.beta=-1")
    assert len(built) == 3


# -- the models the run starts from ------------------------------------------------------------


def test_the_default_base_model_is_built_by_its_stage_so_need_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shutil.copy(Path(__file__).parents[2] / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)  # a fresh clone: no artifacts/base_model yet
    preflight.check(load_params("params.yaml"))


def test_a_base_model_path_that_does_not_exist(project: Path):
    with pytest.raises(ConfigError, match=r"^model\.name_or_path='/no/such/model': no such dir"):
        _check(project, "model.name_or_path=/no/such/model")


def test_a_directory_that_is_not_a_model(project: Path):
    (project / "notes").mkdir()
    with pytest.raises(ConfigError, match=r"model\.name_or_path='notes': .*no config\.json"):
        _check(project, "model.name_or_path=notes")


@pytest.mark.parametrize("hub_id", ["gpt2", "some-org/some-model"])
def test_a_hub_id_offline_and_not_in_the_local_cache(
    project: Path, hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert constants.is_offline_mode()  # tests/conftest.py: HF_HUB_OFFLINE=1
    with pytest.raises(ConfigError) as exc:
        _check(project, f"model.name_or_path={hub_id}")
    message = str(exc.value)
    assert message.startswith(f"model.name_or_path='{hub_id}': no such directory, and no hub")
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path / "empty-cache") in message


def _fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """``model_dir`` as the hub cache holds a download of ``repo_id``; its snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_a_hub_id_in_the_local_cache_is_accepted_offline(
    project: Path, base_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    _fake_hub_cache(tmp_path / "hub", "acme/tiny", base_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _check(project, "model.name_or_path=acme/tiny")


def test_a_hub_id_online_is_left_to_the_download(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _check(project, "model.name_or_path=acme/tiny")  # no network call: nothing to check yet


@pytest.mark.parametrize("key", ["reward.init_from", "evaluate.judge"])
def test_the_other_model_locations_are_checked_too(project: Path, key: str):
    with pytest.raises(ConfigError, match=rf"^{key}='/no/such/model': no such directory"):
        _check(project, f"{key}=/no/such/model")


def test_other_model_locations_that_hold_a_model_are_accepted(project: Path, base_model_dir: Path):
    _check(project, f"reward.init_from={base_model_dir}", f"evaluate.judge={base_model_dir}")


# -- the evaluation's judge ------------------------------------------------------------------


def test_the_gold_judge_is_refused_on_data_that_is_not_the_demos(project: Path):
    _check(project)  # the demo's own held-out prompts: gold is its judge
    other = project / "other_prompts.jsonl"
    other.write_text(
        "".join(json.dumps({"prompt": f"Explain tax law, part {i}."}) + "\n" for i in range(20))
    )
    with pytest.raises(
        ConfigError, match=r"evaluate.judge=gold is the demo task's judge, but 20 of the first 20"
    ):
        _check(project, f"data.prompts_heldout={other.name}")


def test_the_reward_model_the_policy_trains_against_is_no_judge(project: Path):
    with pytest.raises(ConfigError, match="is the reward model the policy is trained against"):
        _check(project, "evaluate.judge=artifacts/reward/model")
    # DPO trains against no reward model: that one may judge it.
    with pytest.raises(ConfigError) as exc:
        _check(project, "evaluate.judge=artifacts/reward/model", "policy.algorithm=dpo")
    assert "trained against" not in str(exc.value)


# -- where the check runs: before anything else --------------------------------------------------


@pytest.mark.slow  # `rlhf run` in a process of its own
def test_rlhf_run_exits_2_with_one_message_and_nothing_ran(project: Path):
    """The installed entry point in its own process, as a user runs it."""
    proc = subprocess.run(
        [BIN / "rlhf", "run", "-S", "sft.args.learning_rate=-1"],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "rlhf: error: sft.args.learning_rate: must be >= 0, got -1\n"
    assert "Traceback" not in proc.stdout
    _nothing_ran(project)  # not even the project lock: it stopped before taking the project


def test_the_flow_checks_before_its_first_stage(project: Path, monkeypatch: pytest.MonkeyPatch):
    """The flow itself (as a deployment runs it, without `rlhf run`): the check comes first."""
    from flows import pipeline

    def started(*_args, **_kwargs):
        raise AssertionError("the flow went past its checks")

    monkeypatch.setattr(pipeline, "_ensure_limits", started)
    monkeypatch.setattr(pipeline.runs, "pipeline_run", started)
    monkeypatch.setattr(pipeline, "run_stage", started)
    try:
        outcome = pipeline.rlhf_pipeline.fn("params.yaml", ["reward.args.learning_rate=-3"])
    except ConfigError as exc:
        error = exc
    else:  # a user's mistake ends the flow Failed, with the error as its data
        assert outcome.is_failed()
        error = outcome.data
    assert isinstance(error, ConfigError)
    assert str(error).startswith("reward.args.learning_rate: must be >= 0")
    _nothing_ran(project)
