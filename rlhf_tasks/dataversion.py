"""The version of the data a run reads, and the version a run is pinned to.

A pipeline run reads its data once: the ``validate`` stage checks the files params' ``data``
section names and copies them, validated, to its output (``artifacts/validate/data``); every later
stage reads those copies. The gate records there (``version.json``) the version it read, and
each later stage is tagged with that version, not with whatever ``data/`` holds when the stage
starts: an ingest or a ``git pull`` that lands during a run makes a version for the next run, and
the lineage of the run's models names exactly the data they were trained on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_tasks.config import Params
from rlhf_tasks.errors import DataError

PINNED = "version.json"  # in the validated data directory


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
    if not files:
        return DataVersion("none", False, paths, "no data files found")
    out, why = _tracking_output(files)
    if out is not None:
        return DataVersion(out, True, paths)
    return DataVersion(_tree_md5(files), False, paths, why)


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


def pin(version: DataVersion, validated_dir: Path) -> None:
    """Record, with the validated copies, the version they were validated from."""
    validated_dir.mkdir(parents=True, exist_ok=True)
    record = {**asdict(version), "paths": list(version.paths)}
    tmp = validated_dir / f".{PINNED}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(validated_dir / PINNED)


def pinned(validated_dir: Path) -> DataVersion | None:
    """The version the validated copies in ``validated_dir`` were made from, if recorded."""
    path = validated_dir / PINNED
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return DataVersion(**{**record, "paths": tuple(record["paths"])})


def refreshed(pin: DataVersion, params: Params) -> DataVersion:
    """``pin``, or DVC's record of the same bytes when they were ``dvc add``-ed after the gate
    read them untracked: the validate stage that DVC then skips (its data did not change)
    keeps its pin, which would go on tagging every run "untracked" with a hash no ``.dvc`` file
    holds."""
    if pin.tracked:
        return pin
    now = data_version(params)
    if not now.tracked:
        return pin
    signature = tuple((str(f), *_stat(f)) for f in _files_read(params))
    return now if _tree_md5_of(signature) == pin.md5 else pin


@functools.lru_cache(maxsize=8)
def _tree_md5_of(signature: tuple[tuple[str, int, int], ...]) -> str:
    return _tree_md5([Path(entry[0]) for entry in signature])


def unchanged_since(before: DataVersion, params: Params) -> None:
    """Raise DataError when the files have changed since ``before`` was read (a write to the
    data while the gate read it: its copies may mix two versions)."""
    after = data_version(params)
    if after.md5 != before.md5:
        raise DataError(
            f"the data changed while the gate read it ({', '.join(before.paths)}: md5 "
            f"{before.md5} when it started, {after.md5} now). Something wrote to it during the "
            "run (a hand edit, a `git pull`, a `dvc checkout`); run again when it is done."
        )
