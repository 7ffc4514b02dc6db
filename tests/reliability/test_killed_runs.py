"""`rlhf run` killed with SIGKILL (its whole process group) during a TRL stage (sft), and sent
SIGTERM during PPO in two processes (which checkpoint the update they are in, then end): the
next run reuses the stages that completed, resumes the killed stage from its last checkpoint,
and the models are registered once, when a run completes. (The reward stage resumes through
the same code as sft, ``training.fit``; a run cancelled from Prefect during PPO is
tests/flows/test_team_scale.py's.)"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import GOOD_EVALUATION as GOOD
from helpers import POLICY, REWARD, set_params
from mlflow import MlflowClient
from reliability_helpers import Run, complete_checkpoint, make_fast
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_tasks import promote
from rlhf_tasks.config import load_params
from rlhf_tasks.runner import run_stage
from rlhf_tasks.stages import STAGES as REGISTRY
from rlhf_tasks.tracking import runs as tracked_runs
from rlhf_tasks.tracking import store

pytestmark = pytest.mark.slow

# The stages killed, where their checkpoints go, their names, and the file each writes last.
STAGES = {
    "sft": ("artifacts/sft/checkpoints", r"checkpoint-\d+", "trainer_state.json"),
    "policy": ("artifacts/policy/checkpoints", r"update-\d+", "history.json"),
}


# PPO's progress bar once an update is done ("ppo:  25%|...| 1/4 [...]").
PPO_UPDATE = re.compile(r"ppo: [^\r\n]*\| [1-9]\d*/\d+ ")


def _last_checkpoint(project: Path, stage: str) -> str:
    where, name, marker = STAGES[stage]
    complete = [
        d
        for d in (project / where).iterdir()
        if re.fullmatch(name, d.name) and (d / marker).exists()
    ]
    return f"{where}/{max(complete, key=lambda d: int(d.name.rpartition('-')[2])).name}"


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))


def test_killed_runs_resume_from_their_checkpoints_and_register_once(
    project: Path, tmp_path: Path, rlhf
) -> None:
    """SIGKILL during SFT; SIGTERM during PPO (what a worker sends a cancelled run), which
    writes a checkpoint of the update it was in: PPO's periodic ones are off here. PPO runs in
    two processes under `accelerate launch`: the SIGTERM reaches them through `rlhf run`, they
    agree on the update to stop after, and what they print reaches `rlhf run`'s output."""
    make_fast(project)
    set_params(project, ["ppo.save_every=1000", "ppo.resources.num_processes=2"])
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    resumed: dict[str, str] = {}  # stage -> the checkpoint the next run must resume from
    runs: list[Run] = []
    scratch = tmp_path / "tmp"  # the runs' TMPDIR: where launch.py writes the launched params
    scratch.mkdir()
    for stage in STAGES:
        run = Run(project, tmp_path / f"run-{len(runs) + 1}.log", {"TMPDIR": str(scratch)})
        runs.append(run)
        if stage == "policy":
            run.wait_for(lambda r=run: PPO_UPDATE.search(r.output()), "a PPO update")
            assert not list((project / STAGES[stage][0]).glob("update-*"))  # none periodic
            run.proc.send_signal(signal.SIGTERM)  # to `rlhf run` only, as a worker sends it
            assert run.finish() == -signal.SIGTERM, run.output()
            assert "SIGTERM: PPO stopped after update" in run.output(), run.output()
            assert not list(scratch.glob("rlhf-policy-*"))  # removed before the process ended
        else:
            run.wait_for(
                complete_checkpoint(project / STAGES[stage][0], *STAGES[stage][1:]),
                f"a {stage} checkpoint",
            )
            run.kill()
        resumed[stage] = _last_checkpoint(project, stage)
        assert not (project / f"artifacts/{stage}/model").exists() or stage == "policy"
        # Killed before promote: nothing registered, not even half.
        assert client.search_registered_models() == []
    # The last run completes: in this process (saves starting one; nothing is killed now).
    code, out, err = rlhf("run")
    assert code == 0, (out, err)
    assert not list((project / "artifacts").glob("*/checkpoints"))  # removed once tracked

    # Each run resumed the stage the run before it was killed in, from its last checkpoint.
    outputs = [run.output() for run in runs[1:]] + [out]
    for stage, output in zip(STAGES, outputs, strict=True):
        assert f"resuming from {resumed[stage]}" in output, (stage, output)
    # The models were registered once, by the run that completed, and the gate promoted them.
    assert _versions(client, POLICY) == _versions(client, REWARD) == ["1"]
    assert str(client.get_model_version_by_alias(POLICY, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(REWARD, "champion").version) == "1"
    # The MLflow runs of the killed processes were ended (KILLED) by the runs after them.
    experiment = client.get_experiment_by_name("rlhf").experiment_id
    killed = client.search_runs([experiment], "attributes.status != 'FINISHED'")
    assert sorted(r.info.run_name for r in killed) == sorted(["rlhf_pipeline"] * 2 + list(STAGES))
    assert {r.info.status for r in killed} == {"KILLED"}
    # Completed stages were reused (Cached), the killed one ran again.
    pipelines = client.search_runs(
        [experiment], "tags.`rlhf.stage` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )
    assert len(pipelines) == 3
    cached = [
        {k.removeprefix("rlhf.cached.") for k in p.data.tags if k.startswith("rlhf.cached.")}
        for p in pipelines
    ]
    assert cached == [
        set(),
        {"base_model", "validate"},
        {"base_model", "validate", "sft", "reward", "judge"},
    ]


class Killed(BaseException):
    """Stands for the process being killed: nothing gets to handle it."""


def test_a_promote_killed_half_way_is_undone_by_the_next(
    project: Path, validated, base_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promote killed after registering the versions, before the gate decided (the window is
    short, so it is simulated: the gate raises, and nothing cleans up, as after a SIGKILL),
    leaves versions without a decision, one holding `challenger`. The next promote of the same
    models removes them first: the registry ends with one decided version of each."""
    validated()
    shutil.copytree(base_model_dir, project / "artifacts/policy/model")
    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1)
    scorer.save_pretrained(project / "artifacts/reward/model")
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(
        project / "artifacts/reward/model"
    )
    (project / "artifacts/policy/run.json").write_text('{"policy/algorithm": "ppo"}')
    (project / "artifacts/validate/report.json").write_text('{"valid": true}')
    (project / "artifacts/evaluate").mkdir(parents=True)
    (project / "artifacts/evaluate/metrics.json").write_text(json.dumps(GOOD))
    params = load_params("params.yaml", [])
    for stage in ("reward", "policy"):  # their MLflow runs, with their models, as the stages log
        with tracked_runs.stage_run(REGISTRY[stage], params) as result:
            result["outputs"] = {"model": f"artifacts/{stage}/model"}
    client = MlflowClient(tracking_uri=store.tracking_uri())

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(promote, "gate", killed)
        m.setattr(promote, "unregister", lambda *args, **kwargs: None)
        with pytest.raises(Killed):
            run_stage("promote", params)
    assert _versions(client, POLICY) == _versions(client, REWARD) == ["1"]
    assert "rlhf.promotion" not in client.get_model_version(POLICY, "1").tags  # no decision

    run_stage("promote", params)
    assert _versions(client, POLICY) == _versions(client, REWARD) == ["2"]
    policy = client.get_model_version(POLICY, "2")
    assert policy.tags["rlhf.promotion"] == "champion"
    assert policy.tags["rlhf.reward_version"] == "2"
    for name in (POLICY, REWARD):
        aliases = client.get_registered_model(name).aliases
        assert {a: str(v) for a, v in aliases.items()} == {"champion": "2", "challenger": "2"}
