"""The lineage tags every MLflow run carries (see ``rlhf_tasks/tracking/__init__.py``)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from rlhf_tasks.config import Params
from rlhf_tasks.tracking.store import redact_url


class UntrackedDataWarning(UserWarning):
    """The run reads data that DVC does not version (or that differs from DVC's record)."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@dataclass(frozen=True)
class DataVersion:
    """The version of the data a run read.

    ``md5``: when every file read lies in one DVC-tracked directory or file (a ``.dvc`` file in
    the project, such as ``data.dvc``) that matches its record, that record's md5, so that
    ``dvc checkout`` of it restores the data. Otherwise DVC's hash of the files read themselves
    (a directory hash over their paths relative to their common parent and their md5s), and
    ``tracked`` is false: the run can say what it read, not where to get it back.
    """

    md5: str
    tracked: bool
    paths: tuple[str, ...]
    remote: str
    why_untracked: str = ""


def data_version(params: Params) -> DataVersion:
    """The version of the files params' ``data`` section names (see ``DataVersion``)."""
    files = _files_read(params)
    signature = tuple((str(f), *_stat(f)) for f in files)
    # Each location once: a file may serve two roles (prompts_rl: the preference pairs' prompts).
    return _data_version(tuple(dict.fromkeys(params.data.roles().values())), signature)


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _files_read(params: Params) -> list[Path]:
    files: list[Path] = []
    for location in params.data.roles().values():
        path = Path(location)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
    return sorted({f.resolve() for f in files})


@functools.lru_cache(maxsize=8)
def _data_version(
    paths: tuple[str, ...], signature: tuple[tuple[str, int, int], ...]
) -> DataVersion:
    files = [Path(entry[0]) for entry in signature]
    remote = _remote()
    if not files:
        return DataVersion("none", False, paths, remote, "no data files found")
    out, why = _tracking_output(files)
    if out is not None:
        return DataVersion(out, True, paths, remote)
    return DataVersion(_tree_md5(files), False, paths, remote, why)


def _tracking_output(files: list[Path]) -> tuple[str | None, str]:
    """(md5 of the DVC output holding every file, "") if there is one and the workspace matches
    it; (None, why not) otherwise."""
    try:
        from dvc.repo import Repo

        repo = Repo(".")
    except Exception:  # not a DVC project
        return None, "this project is not a DVC repository"
    with repo:
        for out in repo.index.outs:
            root = Path(out.fs_path).resolve()
            if out.stage.is_data_source and all(f == root or root in f.parents for f in files):
                if out.changed_checksum():
                    return None, (
                        f"{out} differs from its record in {out.stage.relpath}: run `dvc add "
                        f"{out}` (and commit {out.stage.relpath}) or `dvc checkout {out}`"
                    )
                return str(out.hash_info.value), ""
    return None, "no .dvc file tracks all of them: `dvc add` the data to version it"


def _tree_md5(files: list[Path]) -> str:
    """DVC's hash of a directory, over ``files`` relative to their common parent."""
    import os

    from dvc_data.hashfile.hash import file_md5
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    parent = Path(os.path.commonpath([str(f.parent) for f in files]))
    tree = Tree()
    for f in files:
        key = f.relative_to(parent).parts
        tree.add(key, Meta(size=f.stat().st_size), HashInfo("md5", file_md5(str(f))))
    tree.digest()
    return str(tree.hash_info.value)


def _remote() -> str:
    """The default DVC remote (``name: url``, without credentials), or ``none``."""
    with contextlib.suppress(Exception):  # no DVC repository here: no remote to name
        from dvc.config import Config

        config = Config.from_cwd(validate=False)
        name = config["core"].get("remote")
        if name:
            url = config["remote"][name]["url"]
            if "://" not in url and not Path(url).is_absolute():  # relative to .dvc/
                url = str((Path(".dvc") / url).resolve())
            return f"{name}: {redact_url(url)}"
    return "none"


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def lineage(params: Params, data: DataVersion | None = None) -> dict[str, str]:
    """The lineage tags every run carries (see ``rlhf_tasks/tracking/__init__.py``). Data that
    DVC does not track is warned about: the run's md5 cannot bring it back."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    # dvc.lock is the record this run itself writes as its stages succeed: not a change to code.
    status = _git("status", "--porcelain", "--", ".", ":(exclude)dvc.lock")
    data = data or data_version(params)
    if not data.tracked:
        warnings.warn(
            f"the data this run reads ({', '.join(data.paths)}) is not versioned by DVC: "
            f"{data.why_untracked}. Its runs are tagged with DVC's hash of the files read "
            f"(rlhf.data_md5={data.md5}, rlhf.data_dvc_tracked=false).",
            UntrackedDataWarning,
            stacklevel=2,
        )
    tags = {
        "rlhf.git_commit": commit,
        "rlhf.git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "rlhf.data_md5": data.md5,
        "rlhf.data_dvc_tracked": str(data.tracked).lower(),
        "rlhf.data_paths": json.dumps(list(data.paths)),
        "rlhf.dvc_remote": data.remote,
        "rlhf.params_hash": params_hash(params),
        "mlflow.source.git.commit": commit,
    }
    if "prefect" in sys.modules:  # only a Prefect flow has a flow run; importing it costs seconds
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["rlhf.prefect_flow_run_id"] = str(flow_run.id)
    return tags
