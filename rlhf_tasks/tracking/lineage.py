"""The lineage tags every MLflow run carries (see ``rlhf_tasks/tracking/__init__.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

from rlhf_tasks.config import Params
from rlhf_tasks.dataversion import DataVersion, data_version
from rlhf_tasks.tracking.store import redact_url


class UntrackedDataWarning(UserWarning):
    """The run reads data that DVC does not version (or that differs from DVC's record)."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


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
        "rlhf.dvc_remote": _remote(),
        "rlhf.params_hash": params_hash(params),
        "mlflow.source.git.commit": commit,
    }
    if "prefect" in sys.modules:  # only a Prefect flow has a flow run; importing it costs seconds
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["rlhf.prefect_flow_run_id"] = str(flow_run.id)
    return tags
