"""Multi-process stages: a stage whose section asks for ``resources.num_processes > 1`` runs as
``accelerate launch -m rlhf_tasks.cli stage NAME`` (DDP: one process per GPU, or gloo processes
on a CPU). The stage code is the same in every process: TRL's trainers and our PPO shard the
data across processes and save on the main one; only the main process is tracked in MLflow (as
the nested stage run, via ``RLHF_PARENT_RUN_ID``) and writes the stage's result for the caller.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from rlhf_tasks.config import Params

PARENT_RUN_ENV = "RLHF_PARENT_RUN_ID"
LAUNCHED_ENV = "RLHF_LAUNCHED"  # set for the launched processes: they never launch again


def num_processes(section: str | None, params: Params) -> int:
    """``resources.num_processes`` of the params section that configures a stage's trainer (1
    for a stage that trains nothing: ``section`` None)."""
    if section is None:
        return 1
    return getattr(params, section).resources.num_processes


def inside() -> bool:
    """Whether this process is one of several that a launcher started (this module, torchrun,
    accelerate)."""
    return LAUNCHED_ENV in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(name: str, params: Params, processes: int, parent_run_id: str | None) -> dict[str, Any]:
    """Run stage ``name`` in ``processes`` processes; return the main process's result."""
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{name}-") as tmp:
        params_file, result_file = Path(tmp) / "params.yaml", Path(tmp) / "result.json"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
        command = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--num_processes", str(processes),
            "--num_machines", "1",
            "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(_free_port()),
            # torchrun's launcher, also on a CPU: accelerate's own --cpu launcher starts one
            # process; the stages ask for a CPU state there, which makes gloo process groups.
            "--multi_gpu",
            "--mixed_precision", "no",
            "--dynamo_backend", "no",
            "-m", "rlhf_tasks.cli", "stage", name,
            "--params", str(params_file),
            "--result-file", str(result_file),
        ]  # fmt: skip
        env = {**os.environ, PARENT_RUN_ENV: parent_run_id or "", LAUNCHED_ENV: "1"}
        done = subprocess.run(command, env=env, check=False)
        if done.returncode != 0 or not result_file.exists():
            raise RuntimeError(
                f"stage {name} failed in {processes} processes under accelerate launch "
                f"(exit code {done.returncode}); its output is above"
            )
        return json.loads(result_file.read_text())
