"""The ingestion flow on a fresh clone: a good batch becomes a new data version (data.dvc, a git
commit, the DVC remote); a bad batch changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import BIN, fresh_clone, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clone = fresh_clone(tmp_path_factory.mktemp("ingest") / "clone")
    sh(BIN / "rlhf", "data", "demo", "--check", cwd=clone, code=clone)
    sh(BIN / "rlhf", "stage", "base_model", cwd=clone, code=clone)  # the gate's tokenizer
    return clone


def _md5(clone: Path) -> str:
    return yaml.safe_load((clone / "data.dvc").read_text())["outs"][0]["md5"]


def _snapshot(clone: Path) -> dict[str, bytes]:
    files = [*sorted((clone / "data").rglob("*")), clone / "data.dvc"]
    return {str(p.relative_to(clone)): p.read_bytes() for p in files if p.is_file()}


def _remote_files(clone: Path) -> set[str]:
    remote = clone / "dvc-remote"
    return {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}


def test_a_bad_batch_changes_nothing(clone: Path) -> None:
    heldout_prompt = json.loads((clone / "data/prompts/heldout.jsonl").read_text().splitlines()[0])[
        "prompt"
    ]
    bad = clone.parent / "bad.jsonl"
    rows = [
        {
            "prompt": "Tell me about dogs at the beach.",
            "chosen": "Dogs love to run.",
            "rejected": "Dogs love to run.",
        },
        {"prompt": heldout_prompt, "chosen": "A fine answer here.", "rejected": "No."},
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before, commits = _snapshot(clone), sh("git", "rev-list", "--count", "HEAD", cwd=clone).stdout
    proc = sh(BIN / "rlhf", "ingest", bad, cwd=clone, code=clone, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the batch" in proc.stderr and "failed the validation gate" in proc.stderr
    assert "chosen_differs" in proc.stderr and "heldout_overlap" in proc.stderr
    assert "bad.jsonl:1" in proc.stderr  # file and row
    # One message (the CLI's), and no traceback from Prefect's task or flow engine.
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("chosen_differs: ") == 1, proc.stdout + proc.stderr
    assert _snapshot(clone) == before
    assert sh("git", "rev-list", "--count", "HEAD", cwd=clone).stdout == commits


def test_a_good_batch_becomes_a_new_data_version(clone: Path) -> None:
    existing = (clone / "data/preferences/train.jsonl").read_text().splitlines()
    good = clone.parent / "good.jsonl"
    rows = [
        {
            "prompt": f"Tell me about dogs at the beach, part {i}.",
            "chosen": "Dogs love to run on the sand. Most dogs enjoy a swim. They are lovely.",
            "rejected": "I do not know.",
        }
        for i in range(5)
    ]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows) + existing[0] + "\n")
    md5, remote = _md5(clone), _remote_files(clone)
    proc = sh(BIN / "rlhf", "ingest", good, cwd=clone, code=clone)
    assert "5 new pair(s), 1 already in the data" in proc.stdout, proc.stdout
    # The gate's verdict, in Prefect's log (the task's prints) and so on the console.
    assert f"the batch {good}: Validation gate PASSED" in proc.stderr, proc.stderr
    after = (clone / "data/preferences/train.jsonl").read_text().splitlines()
    assert after[: len(existing)] == existing and len(after) == len(existing) + 5
    assert _md5(clone) != md5
    assert _md5(clone) in sh("git", "show", "HEAD:data.dvc", cwd=clone).stdout
    assert "ingest good.jsonl: +5 preference pairs" in sh("git", "log", "-1", cwd=clone).stdout
    assert len(_remote_files(clone) - remote) >= 2  # the new file and the new .dir manifest
    status = sh(BIN / "dvc", "status", "--cloud", "data.dvc", cwd=clone, code=clone).stdout
    assert "in sync" in status, status
