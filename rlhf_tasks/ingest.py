"""Ingestion of a new batch of preference pairs into the DVC-versioned data.

    rlhf ingest BATCH [--no-push] [--no-commit] [--retrain]      (the Prefect flow rlhf_ingest)

1. ``check``: the batch goes through the validation gate on its own (every check but the
   minimum row count; its held-out prompts checked against the held-out sets), then the training
   set it would become (existing rows + the batch's new rows) goes through it too. A failure names
   the file, the row and the check, and nothing has been written.
2. ``merge``: the batch's rows that are not already in the training set (same prompt, chosen and
   rejected) are appended to ``data.preferences_train`` in the normalised JSONL form (a directory
   gets a new file). The old lines are kept as they were.
3. ``version``: ``dvc add`` of the data directory (a new md5 in ``data.dvc``), then a git commit of
   ``data.dvc`` if the project is a git repository.
4. ``push``: ``dvc push`` to the default remote.

If ``merge`` or ``version`` fails, the training file and ``data.dvc`` are restored byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from rlhf_tasks import data, validate
from rlhf_tasks.config import Params
from rlhf_tasks.errors import ConfigError

DEFAULT_OUT = Path("artifacts/ingest")
KEY = ("prompt", "chosen", "rejected")


class IngestRejected(validate.ValidationFailed):
    """The batch, or the training set it would make, failed the validation gate."""


def _key(row: dict[str, Any]) -> tuple:
    return tuple((row.get(k) or "").strip() for k in KEY)


def _gate(params: Params, paths: list[str], out_dir: Path, what: str) -> None:
    heldout = [params.data.preferences_heldout, params.data.prompts_heldout]
    report, result = validate.validate(params, paths=paths, heldout=heldout, out_dir=out_dir)
    if not report.valid:
        summary = validate.summary(report, result["outputs"])
        raise IngestRejected(f"{what} failed the validation gate; data/ is unchanged.\n{summary}")


def check(params: Params, batch: str | Path, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    """Validate the batch, then the training set it would make; return the rows to add."""
    batch = Path(batch)
    if not batch.exists():
        raise ConfigError(f"{batch}: no such file")
    shutil.rmtree(out_dir, ignore_errors=True)  # no report of an earlier batch is left behind
    small = params.model_copy(
        update={"validate_": params.validate_config.model_copy(update={"min_rows": 1})}
    )
    _gate(small, [str(batch)], out_dir / "batch", f"the batch {batch}")
    existing = data.load([params.data.preferences_train], kind="preferences").frame
    incoming = data.load([str(batch)], kind="preferences").frame
    seen = {_key(r) for r in existing.to_dict(orient="records")}
    fresh = []
    for row in incoming.to_dict(orient="records"):
        if _key(row) not in seen:
            seen.add(_key(row))
            fresh.append({k: v for k, v in row.items() if not k.startswith("_") and v is not None})
    if fresh:
        with tempfile.TemporaryDirectory() as tmp:
            new_rows = Path(tmp) / "new_rows.jsonl"
            _append(new_rows, fresh)
            paths = [params.data.preferences_train, str(new_rows)]
            _gate(params, paths, out_dir / "merged", "the training set with the batch")
    return {
        "batch": str(batch),
        "rows": len(incoming),
        "new_rows": fresh,
        "duplicates": len(incoming) - len(fresh),
    }


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def merge_and_version(
    params: Params, checked: dict[str, Any], commit: bool = True
) -> dict[str, Any]:
    """Append the new rows, ``dvc add`` the data directory, commit ``data.dvc``; restore the
    training file and ``data.dvc`` exactly as they were if any step fails."""
    from dvc.repo import Repo

    rows = checked["new_rows"]
    dvc_file = Path(f"{params.data.dir}.dvc")
    if not rows:
        return {"added": 0, "md5": _md5(dvc_file), "committed": False}
    target = Path(params.data.preferences_train)
    if target.is_dir():
        target = target / f"ingested-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    backups = {path: path.read_bytes() for path in (target, dvc_file) if path.exists()}
    try:
        tmp = target.with_name(f".{target.name}.tmp")
        if target.exists():
            shutil.copyfile(target, tmp)
        _append(tmp, rows)
        tmp.replace(target)
        with Repo(".") as repo:
            repo.add(params.data.dir)
        committed = False
        if commit and _git("rev-parse", "--git-dir").returncode == 0:
            _git("add", str(dvc_file))
            message = f"ingest {Path(checked['batch']).name}: +{len(rows)} preference pairs"
            done = _git("commit", "-m", message, "--", str(dvc_file))
            if done.returncode:
                raise RuntimeError(f"git commit of {dvc_file} failed: {done.stderr.strip()}")
            committed = True
    except BaseException:
        for path, content in backups.items():
            path.write_bytes(content)
        if target not in backups:
            target.unlink(missing_ok=True)
        raise
    return {"added": len(rows), "md5": _md5(dvc_file), "committed": committed}


def _md5(dvc_file: Path) -> str | None:
    import yaml

    if not dvc_file.exists():
        return None
    return (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [{}])[0].get("md5")


def push(params: Params) -> int:
    """``dvc push`` of the data to the default remote; return the number of files sent."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return int(repo.push(targets=[f"{params.data.dir}.dvc"]))
