"""The demo data under DVC: data.dvc's md5, a push/pull round trip, and a fresh clone's `dvc repro`.

The DVC tests run the real ``dvc`` and ``rlhf`` executables of the virtualenv running the tests,
in temporary git repositories, as a user on a fresh machine would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import BIN, ROOT, fresh_clone, sh

from rlhf_tasks import demo
from rlhf_tasks.config import load_params

FIX_DATA_DVC = (
    "run `rlhf data demo --force && dvc add data` and commit data.dvc "
    "(the demo generator or params.yaml's demo section changed without updating data.dvc)"
)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _outs(dvc_file: Path) -> dict:
    (out,) = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"]
    return out


def _git_dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sh("git", "init", "-q", cwd=path)
    sh(BIN / "dvc", "init", "-q", cwd=path)
    return path


# -- data.dvc is the generator's output ---------------------------------------------------------


@pytest.mark.slow
def test_demo_data_md5_matches_data_dvc(tmp_path: Path):
    repo = _git_dvc_repo(tmp_path / "repo")
    params = load_params(ROOT / "params.yaml")
    demo.generate(params.demo, params.data, root=repo)
    sh(BIN / "dvc", "add", params.data.dir, cwd=repo)
    generated = _outs(repo / f"{params.data.dir}.dvc")
    committed = _outs(ROOT / "data.dvc")
    assert committed["path"] == params.data.dir
    assert generated["md5"] == committed["md5"], (
        f"the demo data's md5 is {generated['md5']} but data.dvc says {committed['md5']}: "
        + FIX_DATA_DVC
    )
    assert (generated["size"], generated["nfiles"]) == (committed["size"], committed["nfiles"]), (
        FIX_DATA_DVC
    )


# -- the remote ---------------------------------------------------------------------------------


def test_local_remote_is_inside_the_repo_and_git_ignored():
    config = (ROOT / ".dvc" / "config").read_text(encoding="utf-8")
    assert "remote = local" in config
    assert "url = ../dvc-remote" in config  # relative to .dvc/: <repo>/dvc-remote
    assert sh("git", "check-ignore", "-q", "dvc-remote", cwd=ROOT, check=False).returncode == 0
    assert sh("git", "check-ignore", "-q", "data", cwd=ROOT, check=False).returncode == 0


@pytest.mark.slow
def test_push_pull_round_trip(tmp_path: Path, demo_root: Path):
    repo = _git_dvc_repo(tmp_path / "repo")
    # The project's own DVC config: its default remote `local` resolves to <repo>/dvc-remote.
    shutil.copyfile(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(demo_root / "data", repo / "data")
    original = _tree_bytes(repo / "data")
    assert original

    sh(BIN / "dvc", "add", "data", cwd=repo)
    sh(BIN / "dvc", "push", cwd=repo)
    remote = repo / "dvc-remote"
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    assert len(pushed) == len(original) + 1  # every file and the directory listing (.dir)

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert not (repo / ".dvc" / "cache").exists()

    sh(BIN / "dvc", "pull", cwd=repo)
    assert _tree_bytes(repo / "data") == original
    assert "up to date" in sh(BIN / "dvc", "status", cwd=repo).stdout.lower()
    print(sh(BIN / "dvc", "status", "--cloud", cwd=repo).stdout)


@pytest.mark.slow
def test_pull_without_the_remote_fails(tmp_path: Path, demo_root: Path):
    """The round trip above really reads the remote: without it, pull cannot restore data/."""
    repo = _git_dvc_repo(tmp_path / "repo")
    shutil.copyfile(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(demo_root / "data", repo / "data")
    sh(BIN / "dvc", "add", "data", cwd=repo)
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    proc = sh(BIN / "dvc", "pull", cwd=repo, check=False)
    assert proc.returncode != 0
    assert not (repo / "data" / "stats.json").exists()


# -- a fresh clone ------------------------------------------------------------------------------


@pytest.mark.slow
def test_fresh_clone_demo_check(tmp_path: Path):
    """`make demo`'s first step on a fresh clone: no DVC cache, no remote data, only git.

    data/ is generated and must be recognised as the version in data.dvc, though DVC's cache does
    not hold it yet (`dvc status` says "not in cache" there, which is no mismatch).
    """
    clone = fresh_clone(tmp_path / "clone")
    proc = sh(BIN / "rlhf", "data", "demo", "--check", cwd=clone, check=False, code=clone)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    md5 = _outs(clone / "data.dvc")["md5"]
    assert "data/ matches data.dvc" in proc.stdout
    assert md5 in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_after_the_demo_dvc_status_is_clean_and_dvc_lock_is_the_run_s_record(demo_run) -> None:
    """`make demo` on a fresh clone (`rlhf data demo --check`, then the Prefect flow) records
    each stage it runs in dvc.lock and DVC's cache, on whatever CPU trained it: DVC sees nothing
    to reproduce (dvc.lock holds the hashes of the models now on disk), and `dvc push` uploads
    the models."""
    clone = demo_run.clone
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        assert (clone / "artifacts/mlflow_runs" / f"{stage}.json").exists(), stage
    status = sh(BIN / "dvc", "status", "--json", cwd=clone, code=clone).stdout
    assert json.loads(status) == {}, status
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    (policy_out,) = [o for o in lock["policy"]["outs"] if o["path"] == "artifacts/policy/model"]
    assert policy_out["md5"].endswith(".dir")
    # dvc.lock is the only file in git the run changed (when this CPU trained other bytes than
    # the committed record's): outputs are git-ignored, data/ is DVC's.
    changed = sh("git", "status", "--porcelain", cwd=clone).stdout
    assert {line[3:] for line in changed.splitlines()} <= {"dvc.lock"}, changed
    pushed = sh(BIN / "dvc", "push", cwd=clone, code=clone)
    assert "pushed" in pushed.stdout or "Everything is up to date" in pushed.stdout
    cloud = sh(BIN / "dvc", "status", "--cloud", "--json", cwd=clone, code=clone).stdout
    assert json.loads(cloud) == {}, cloud


def test_runs_record_the_version_of_the_data_they_read(
    tmp_path: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch
):
    """rlhf.data_md5 is the md5 of the .dvc file that tracks the files read, when they are in the
    version it records; else DVC's hash of the files themselves, tagged untracked, with a
    warning."""
    from rlhf_tasks.dataversion import data_version, unchanged_since
    from rlhf_tasks.errors import DataError
    from rlhf_tasks.tracking.lineage import UntrackedDataWarning, lineage

    repo = _git_dvc_repo(tmp_path / "repo")
    shutil.copytree(demo_root / "data", repo / "data")
    sh(BIN / "dvc", "add", "data", cwd=repo)
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(repo)
    params = load_params("params.yaml")
    tracked = data_version(params)
    assert (tracked.md5, tracked.tracked) == (_outs(repo / "data.dvc")["md5"], True)

    outside = tmp_path / "elsewhere"  # the same files, outside data/: no .dvc file tracks them
    shutil.copytree(repo / "data", outside)
    moved = params.model_copy(
        update={
            "data": params.data.model_copy(
                update={
                    role: str(outside / Path(path).relative_to("data"))
                    for role, path in params.data.roles().items()
                }
            )
        }
    )
    untracked = data_version(moved)
    assert not untracked.tracked and untracked.md5.endswith(".dir")
    assert untracked.md5 != tracked.md5  # the files read, not all of data/ (stats.json)
    with pytest.warns(UntrackedDataWarning, match="not versioned by DVC"):
        tags = lineage(moved)
    assert (tags["rlhf.data_md5"], tags["rlhf.data_dvc_tracked"]) == (untracked.md5, "false")
    assert str(outside) in tags["rlhf.data_paths"]

    train = repo / "data/sft/train.jsonl"  # tracked, but changed since `dvc add`
    train.write_text(train.read_text()[:-200])
    changed = data_version(params)
    assert not changed.tracked and "differs from its record in data.dvc" in changed.why_untracked

    # The gate pins the version it read; a write while it reads fails it (its copies would mix two
    # versions).
    train.write_text(train.read_text() + "\n")
    with pytest.raises(DataError, match="the data changed while the gate read it"):
        unchanged_since(changed, params)


# -- `rlhf data demo` does not overwrite data silently ------------------------------------------


def test_data_demo_refuses_to_overwrite_a_changed_file(project: Path, rlhf, demo_root: Path):
    target = project / "data" / "prompts" / "rl.jsonl"
    changed = b'{"prompt": "my own prompt"}\n'
    target.write_bytes(changed)
    (project / "data" / "stats.json").unlink()

    code, _, err = rlhf("data", "demo")
    assert code == 1
    assert "data/prompts/rl.jsonl" in err
    assert "--force" in err
    assert "Traceback" not in err
    assert target.read_bytes() == changed
    # Nothing at all is written when it refuses, not even the missing file.
    assert not (project / "data" / "stats.json").exists()

    code, out, err = rlhf("data", "demo", "--force")
    assert code == 0, err
    assert target.read_bytes() == (demo_root / "data" / "prompts" / "rl.jsonl").read_bytes()
    assert _tree_bytes(project / "data") == _tree_bytes(demo_root / "data")
    assert "2 file(s) written" in out


def test_data_demo_is_a_no_op_on_the_same_data(project: Path, rlhf, demo_root: Path):
    before = {p: p.stat().st_mtime_ns for p in (project / "data").rglob("*") if p.is_file()}
    code, out, err = rlhf("data", "demo")
    assert code == 0, err
    assert "0 file(s) written" in out
    assert {p: p.stat().st_mtime_ns for p in (project / "data").rglob("*") if p.is_file()} == before
    assert _tree_bytes(project / "data") == _tree_bytes(demo_root / "data")
