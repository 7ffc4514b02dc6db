"""When a stage may be skipped: its cache key, and whether its outputs on disk are still its own.

The cache key of a stage is the sha256 of

    the stage's name,
    the params sections it reads (its ``params`` in dvc.yaml), as resolved JSON,
    the content of each of its deps in dvc.yaml: the data directory (the data version), the
        upstream stages' outputs it reads, and its own code,

so the key changes when the data, its params, an upstream output or its code changes, and only
then. A stage whose key is unchanged reuses its previous result instead of running; changing
``ppo`` re-runs ``policy`` and, because its output changes, the stages after it.

A cached result is reused only if the stage's outputs on disk are the ones that run produced:
after each run, ``artifacts/cache/<stage>.json`` records the key and the digest of the outputs
(its ``outs`` and ``metrics`` in dvc.yaml). An output that is missing, or was overwritten by a run
with other params, means the stage runs again (and its cached result is replaced).

``promote`` is never cached: its decision depends on the registry, not only on files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rlhf_tasks import tracking
from rlhf_tasks.config import Params

CACHE_DIR = tracking.ARTIFACTS / "cache"
NEVER_CACHED = {"promote"}


def digest(path: Path) -> str | None:
    """sha256 of a file, or of a directory's files (relative paths and contents); None if absent."""
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _outs(name: str) -> list[str]:
    stage = tracking.dvc_stage(name)
    paths = []
    for key in ("outs", "metrics"):
        for entry in stage.get(key, []):
            paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def key(name: str, params: Params) -> str:
    """The stage's cache key (see the module docstring)."""
    stage = tracking.dvc_stage(name)
    dump = params.model_dump(mode="json", by_alias=True)
    h = hashlib.sha256(name.encode())
    for section in tracking.stage_sections(name):
        h.update(json.dumps({section: dump.get(section)}, sort_keys=True).encode())
    for dep in stage.get("deps", []):
        h.update(f"{dep}={digest(Path(dep))}".encode())
    return h.hexdigest()


def outputs_digest(name: str) -> str | None:
    """Digest of all the stage's outputs; None if any is missing (or it declares none)."""
    digests = [digest(Path(out)) for out in _outs(name)]
    if not digests or None in digests:
        return None
    return hashlib.sha256("".join(digests).encode()).hexdigest()  # type: ignore[arg-type]


def reusable(name: str, cache_key: str) -> bool:
    """Whether the outputs on disk are the ones the last run with ``cache_key`` produced."""
    if name in NEVER_CACHED:
        return False
    path = CACHE_DIR / f"{name}.json"
    if not path.exists():
        return False
    record: dict[str, Any] = json.loads(path.read_text())
    return record.get("key") == cache_key and record.get("outputs") == outputs_digest(name)


def record(name: str, cache_key: str) -> None:
    """After a run: remember which key produced the outputs now on disk."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_DIR / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"key": cache_key, "outputs": outputs_digest(name)}, indent=2) + "\n")
    tmp.replace(CACHE_DIR / f"{name}.json")
