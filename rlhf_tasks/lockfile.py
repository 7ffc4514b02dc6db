"""DVC's record of the pipeline: whether a stage may be skipped, and recording a stage's run.

DVC decides both, from ``dvc.yaml`` (generated from the registry) and ``dvc.lock``:

- a stage is **up to date** when ``dvc status`` has nothing to say about it: its deps (inputs
  and code), params and outputs are the ones its ``dvc.lock`` entry records, and its cached
  outputs are in DVC's cache. There is no second cache key that could drift from ``dvc.yaml``.
- when a stage of ``rlhf run`` or ``rlhf stage`` succeeds, its ``dvc.lock`` entry and DVC's
  cache are updated as ``dvc commit <stage>`` would. ``dvc status`` then agrees with what ran,
  ``dvc push`` uploads its models, and ``git diff dvc.lock`` shows what the run changed.

DVC reads params from ``params.yaml``. A run whose params for a stage differ from that file's
(``-S`` overrides, or ``--params other.yaml``) is not recorded for that stage (DVC would record
values it did not run with) and is never skipped; ``rlhf run`` says so. Under ``dvc repro`` the
stage's command is run by DVC, which records it itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_tasks.config import DEFAULT_PARAMS, Params, load_params
from rlhf_tasks.stages import Stage


@contextlib.contextmanager
def _repo() -> Iterator[Any]:
    """The project's DVC repository, with DVC's info messages ("Updating lock file") kept out
    of the run's output: the runner says what matters."""
    from dvc.repo import Repo

    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with Repo(".") as repo:
            yield repo
    finally:
        logger.setLevel(level)


def not_recordable(stage: Stage, params: Params) -> str | None:
    """Why DVC cannot record (or skip) this run of ``stage``; None if it can."""
    if os.environ.get("DVC_STAGE"):
        return "`dvc repro` runs this stage and records it itself"
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").is_file():
        return "this project has no DVC repository (.dvc/) or no dvc.yaml"
    if not DEFAULT_PARAMS.is_file():
        return f"there is no {DEFAULT_PARAMS}, where dvc.yaml reads the params"
    missing = [dep for dep in stage.deps() if not Path(dep).exists()]
    if missing:
        return f"dvc.yaml's deps {', '.join(missing[:3])} are not in this directory"
    recorded = load_params(DEFAULT_PARAMS).model_dump(mode="json", by_alias=True)
    used = params.model_dump(mode="json", by_alias=True)
    differ = [s for s in stage.sections if recorded.get(s) != used.get(s)]
    if differ:
        return (
            f"its params ({', '.join(differ)}) differ from {DEFAULT_PARAMS}'s (overrides or "
            "another params file), which is what DVC records"
        )
    return None


def up_to_date(stage: Stage, params: Params) -> bool:
    """Whether DVC finds ``stage`` unchanged since the run its ``dvc.lock`` entry records."""
    if not stage.cached or not_recordable(stage, params) is not None:
        return False
    try:
        with _repo() as repo:
            return not repo.status(targets=[stage.name])
    except Exception as exc:  # e.g. another dvc process holds the repository's lock
        print(f"stage {stage.name}: DVC could not tell whether it changed ({exc}); running it")
        return False


def record(stage: Stage, params: Params) -> str | None:
    """After ``stage`` succeeded: its ``dvc.lock`` entry and DVC's cache, as ``dvc commit``
    would update them. Returns why it was not recorded, if it was not."""
    why = not_recordable(stage, params)
    if why is None:
        try:
            with _repo() as repo:
                repo.commit(stage.name, force=True)
        except Exception as exc:  # the stage succeeded: only its record failed, and says so
            return f"DVC could not record it ({exc})"
    return why


def status() -> dict[str, Any]:
    """``dvc status`` of the whole pipeline and data (empty when everything is up to date)."""
    with _repo() as repo:
        return repo.status()
