"""The data version a run is tagged with when the data was `dvc add`-ed after the gate read it
untracked: the validate stage, whose data did not change, is skipped and keeps its pin; the
runs after it name DVC's record of those same bytes, not the old "untracked" hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import BIN, sh

from rlhf_tasks import dataversion
from rlhf_tasks.config import load_params
from rlhf_tasks.stages import STAGES
from rlhf_tasks.tracking import runs

pytestmark = pytest.mark.slow  # DVC for real


def test_a_pin_made_untracked_names_the_dvc_record_once_the_data_is_added(project: Path):
    params = load_params("params.yaml")
    sh(BIN / "dvc", "init", "--no-scm", "-q", cwd=project)
    before = dataversion.data_version(params)
    assert not before.tracked and "dvc add" in before.why_untracked
    validated = project / STAGES["validate"].outputs["data"].path
    dataversion.pin(before, validated)  # what the gate wrote, untracked
    assert runs.validated_version(params) == before

    sh(BIN / "dvc", "add", "data", "-q", cwd=project)
    recorded = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    dataversion._data_version.cache_clear()  # a new .dvc file, same files: the cache's key
    now = runs.validated_version(params)
    assert now.tracked and now.md5 == recorded != before.md5

    # Other bytes than the gate read: the pin stands (the runs read the validated copies).
    (project / "data/sft/train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    sh(BIN / "dvc", "add", "data", "-q", cwd=project)
    dataversion._data_version.cache_clear()
    assert runs.validated_version(params) == before
