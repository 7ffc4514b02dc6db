"""What a run does when something it relies on fails: a checkpoint that cannot be written (a full
disk), and the MLflow tracking server going away in the middle of a run."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from reliability_helpers import MlflowServer, Run, complete_checkpoint, make_fast
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_tasks import ppo
from rlhf_tasks.config import PpoSection, load_params
from rlhf_tasks.errors import CheckpointError
from rlhf_tasks.stages import call

pytestmark = pytest.mark.slow

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class Killed(BaseException):
    """Stands for the process being killed: nothing gets to handle it."""


def _fail_writing(monkeypatch: pytest.MonkeyPatch, target: str, exc: BaseException) -> None:
    """``torch.save`` to a path ending in ``target`` writes a few bytes and raises ``exc``, as a
    write that runs out of disk half way (or a process killed while writing) leaves it."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(target):
            Path(f).write_bytes(b"\0" * 16)
            raise exc
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


# -- a checkpoint that cannot be written --------------------------------------------------------

SFT = [  # 6 steps of batch 8, a checkpoint every 2; every step logged
    "sft.args.max_steps=6",
    "sft.args.per_device_train_batch_size=8",
    "sft.args.logging_steps=1",
    "sft.args.save_steps=2",
    "sft.args.save_total_limit=1",
    "sft.args.disable_tqdm=true",
]


def test_sft_checkpoint_failures_keep_the_last_complete_checkpoint(
    project: Path, validated, rlhf, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL's Trainer writes checkpoint-N in place, trainer_state.json last: a run killed while
    writing one leaves half a checkpoint, which the next run must not resume from; a write that
    fails (a full disk) fails the stage naming the checkpoint and the cause."""
    validated(sft=48)
    checkpoints = project / "artifacts/sft/checkpoints"
    # 1. Killed while writing checkpoint-4: its weights are there, its optimizer half written,
    #    no trainer_state.json. checkpoint-2 was complete.
    with monkeypatch.context() as m:
        _fail_writing(m, "checkpoint-4/optimizer.pt", Killed())
        with pytest.raises(Killed):
            call("sft", load_params("params.yaml", SFT))
    assert (checkpoints / "checkpoint-4/model.safetensors").exists()
    assert not (checkpoints / "checkpoint-4/trainer_state.json").exists()
    assert (checkpoints / "checkpoint-2/trainer_state.json").exists()

    # 2. The next run resumes from checkpoint-2, not from the half checkpoint-4 (which it
    #    removes); then the disk is full when it writes checkpoint-6: the stage fails with an
    #    error naming that checkpoint and the cause, and the previous one is kept.
    with monkeypatch.context() as m:
        _fail_writing(m, "checkpoint-6/optimizer.pt", ENOSPC)
        code, out, err = rlhf("stage", "sft", *(f"-S{o}" for o in SFT))
    assert "checkpoint-4: incomplete" in out and "resuming from " in out, out
    assert f"resuming from {Path('artifacts/sft/checkpoints/checkpoint-2')}" in out, out
    assert code == 4, (out, err)
    assert "could not write checkpoint artifacts/sft/checkpoints/checkpoint-6" in err, err
    assert "No space left on device" in err
    assert "the previous checkpoint, artifacts/sft/checkpoints/checkpoint-4, is intact" in err
    assert "Traceback" not in err
    assert [p.name for p in checkpoints.iterdir() if p.is_dir()] == ["checkpoint-4"]
    assert not (project / "artifacts/sft/model").exists()

    # 3. With space again, the stage resumes from checkpoint-4 and completes.
    result = call("sft", load_params("params.yaml", SFT))
    assert result["metrics"]["sft/resumed_from_step"] == 4
    assert result["metrics"]["sft/steps"] == 6
    assert (project / "artifacts/sft/model/model.safetensors").exists()
    # Untracked (``call``), the last checkpoint is kept until the runner has tracked the stage.
    assert (checkpoints / "checkpoint-6/trainer_state.json").exists()


@pytest.fixture
def reward_dir(base_model_dir: Path, tmp_path: Path) -> Path:
    """An untrained reward model on the base model's body."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1)
    model.save_pretrained(tmp_path / "reward")
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(tmp_path / "reward")
    return tmp_path / "reward"


def test_ppo_checkpoint_that_cannot_be_written_fails_clearly_and_resumes(
    base_model_dir: Path, reward_dir: Path, demo_root: Path, tmp_path: Path, monkeypatch
) -> None:
    cfg = PpoSection(
        total_episodes=32,
        rollout_batch_size=8,
        mini_batch_size=8,
        ppo_epochs=1,
        response_length=8,
        save_every=1,
        keep_checkpoints=2,
    )
    out = tmp_path / "policy"

    def run() -> dict:
        return ppo.train(
            cfg,
            policy=base_model_dir,
            reward_model=reward_dir,
            prompts=demo_root / "data/prompts/rl.jsonl",
            out_dir=out,
            run_id="a",
        )

    with monkeypatch.context() as m:
        _fail_writing(m, "update-3.tmp/state.pt", ENOSPC)
        with pytest.raises(CheckpointError) as failed:
            run()
    message = str(failed.value)
    assert f"could not write checkpoint {out / 'checkpoints/update-3'}" in message
    assert "No space left on device" in message
    assert f"the previous checkpoint, {out / 'checkpoints/update-2'}, is intact" in message
    # Nothing of update-3 is left; keep_checkpoints=2 kept the last two complete ones.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "run_id",
        "update-1",
        "update-2",
    ]
    assert not (out / "model").exists()

    result = run()
    assert result["resumed_from_update"] == 2
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["update"] for row in history] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "run_id",
        "update-3",
        "update-4",
    ]


# -- the MLflow tracking server goes away --------------------------------------------------------


POLICY, REWARD = "rlhf-demo-policy", "rlhf-demo-reward"


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))


def test_tracking_server_outages(project: Path, tmp_path: Path) -> None:
    """`rlhf run` against a real `mlflow server` that stops in the middle of the run. Down for a
    restart: MLflow's client retries and the run completes, its models registered once. Left
    down: the run fails soon, with exit code 4 and a message naming the server, and changes
    nothing in the registry."""
    make_fast(project)
    server = MlflowServer(tmp_path / "mlflow")
    registry = MlflowClient(f"sqlite:///{server.root / 'mlflow.db'}")  # the server's own store
    # The retries' backoff halved (the project's defaults: 5 retries after 0, 4, 8, 16 and 32 s):
    # a request retries soon after the server is back, and still waits out a restart of up to
    # a minute (after 0, 2, 4, 8, 16 and 32 s).
    tracked = {
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
    }
    try:
        # 1. The run starts while the server is still starting (its first requests wait for it).
        #    The server stops while SFT trains (at its first checkpoint), and is started again
        #    once the run has found it gone: the run waits for it, and completes.
        blip = Run(project, tmp_path / "blip.log", tracked)
        server.start()
        blip.wait_for(
            complete_checkpoint(
                project / "artifacts/sft/checkpoints", r"checkpoint-\d+", "trainer_state.json"
            ),
            "an SFT checkpoint",
        )
        server.stop()
        blip.wait_for(lambda: "Connection refused" in blip.output(), "a request that was refused")
        server.start()
        assert blip.finish() == 0, blip.output()
        # A run that completes leaves no checkpoints (removed once its stage was tracked).
        assert not list((project / "artifacts").glob("*/checkpoints"))
        assert _versions(registry, POLICY) == _versions(registry, REWARD) == ["1"]
        assert str(registry.get_model_version_by_alias(POLICY, "champion").version) == "1"

        # 2. Another run (new PPO params: policy, evaluate and promote run again); the server
        #    stops during PPO and stays down. One retry, so that the test does not wait out the
        #    minute of backoff.
        down = Run(
            project,
            tmp_path / "down.log",
            {**tracked, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"},
            overrides=("ppo.ppo_epochs=2",),
        )
        down.wait_for(
            lambda: any((project / "artifacts/policy/checkpoints").glob("update-*/history.json")),
            "a PPO checkpoint",
        )
        server.stop()
        code = down.finish()
        out = down.output()
        assert code == 4, out
        assert "rlhf: error: stage " in out, out
        assert f"the MLflow tracking server at {server.url} did not answer" in out, out
        assert "Connection refused" in out and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in out
        assert "Traceback" not in out, out
        # Nothing registered, no alias moved.
        assert _versions(registry, POLICY) == _versions(registry, REWARD) == ["1"]
        for name in (POLICY, REWARD):
            aliases = registry.get_registered_model(name).aliases
            assert {a: str(v) for a, v in aliases.items()} == {"champion": "1", "challenger": "1"}
    finally:
        server.stop()
