"""What the runner hands a stage: where it reads and writes, and where its progress goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageIO:
    """Where a stage reads and writes, and how it reports progress (given by the runner).

    ``inputs`` and ``outputs`` map roles to paths; ``workdir`` (``artifacts/<stage>``) holds what
    is neither an input nor a declared output: checkpoints, ``run.json`` (runtime figures that
    vary between runs), a validation's Data Docs. ``log_step(metrics, step)`` and
    ``progress(fraction)`` go to the stage's MLflow run and Prefect task when it has them."""

    inputs: dict[str, Path]
    outputs: dict[str, Path]
    workdir: Path
    log_step: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    progress: Callable[[float], None] = lambda fraction: None

    @property
    def checkpoints(self) -> Path:
        return self.workdir / "checkpoints"
