"""When DVC may record (and so skip) a stage's run: only runs of params.yaml's own values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import BIN, ROOT, sh

from rlhf_tasks import lockfile
from rlhf_tasks.config import load_params
from rlhf_tasks.stages import STAGES


@pytest.fixture
def dvc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "rlhf_tasks", tmp_path / "rlhf_tasks")
    sh(BIN / "dvc", "init", "--no-scm", "-q", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return tmp_path


def test_a_run_of_params_yaml_is_recordable_an_override_only_for_the_stages_it_changes(
    dvc_dir: Path,
) -> None:
    base = STAGES["base_model"]  # no inputs: only its code must be here
    assert lockfile.not_recordable(base, load_params("params.yaml")) is None
    assert lockfile.not_recordable(base, load_params("params.yaml", ["sft.seed=3"])) is None
    why = lockfile.not_recordable(base, load_params("params.yaml", ["base_model.seed=3"]))
    assert why is not None and "base_model" in why and "params.yaml" in why
    # Never skipped either: DVC would compare the outputs with params.yaml's values.
    assert not lockfile.up_to_date(base, load_params("params.yaml", ["base_model.seed=3"]))


def test_a_stage_whose_inputs_are_missing_is_not_recorded(dvc_dir: Path) -> None:
    why = lockfile.not_recordable(STAGES["sft"], load_params("params.yaml"))
    assert why is not None and "artifacts/validate/data/sft_train.jsonl" in why


def test_under_dvc_repro_dvc_records_the_stage_itself(
    dvc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_STAGE", "base_model")
    why = lockfile.not_recordable(STAGES["base_model"], load_params("params.yaml"))
    assert why is not None and "dvc repro" in why


def test_outside_a_dvc_repository_nothing_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    assert "no DVC repository" in lockfile.not_recordable(STAGES["base_model"], params)
    assert lockfile.record(STAGES["base_model"], params) is not None
    assert not (tmp_path / "dvc.lock").exists()
