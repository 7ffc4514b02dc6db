"""Checkpoints of a PPO run: everything an update changes, written so that a checkpoint is
complete or absent, and read back so that a resumed run makes exactly the updates an
uninterrupted one makes. A checkpoint is a directory ``out_dir/checkpoints/update-N``."""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_tasks.launch import DeferredSigterm
from rlhf_tasks.ppo.maths import KLController
from rlhf_tasks.ppo.rollout import ValueModel
from rlhf_tasks.training import checkpoint_error, claim_checkpoints


def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    found = [
        p
        for p in (out_dir / "checkpoints").glob("update-*")
        if p.name.split("-")[1].isdigit() and (p / "state.pt").exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _fsync(directory: Path) -> None:
    """Flush a directory's files and the directory itself to disk."""
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _State:
    """What a checkpoint holds besides the metrics: everything an update changes."""

    accelerator: Any
    policy: Any
    value_model: Any
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer
    policy_sched: Any
    value_sched: Any
    kl_ctl: KLController

    def _plain(self, name: str) -> Any:
        """The model without its DDP and ValueModel wrappers (the checkpoint's format)."""
        model = self.accelerator.unwrap_model(getattr(self, name))
        return model.model if isinstance(model, ValueModel) else model

    def save(self, path: Path, history: list[dict], keep: int) -> None:
        """Weights, optimizers, schedulers, KL coefficient and the metrics so far, written to a
        temporary directory renamed into place: a checkpoint is complete or absent. (The RNG
        needs no saving: each update seeds itself.)"""
        from safetensors.torch import save_model

        tmp = path.with_name(path.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in ("policy", "value_model"):
                save_model(self._plain(name), str(tmp / f"{name}.safetensors"))  # LoRA or not
            torch.save(
                {
                    "policy_opt": self.policy_opt.state_dict(),
                    "value_opt": self.value_opt.state_dict(),
                    "policy_sched": self.policy_sched.state_dict(),
                    "value_sched": self.value_sched.state_dict(),
                    "kl_ctl": self.kl_ctl.state_dict(),
                    "update": int(path.name.split("-")[1]),
                },
                tmp / "state.pt",
            )
            (tmp / "history.json").write_text(json.dumps(history))
            _fsync(tmp)  # on disk before it is renamed into place, not only in the page cache
        except Exception as exc:  # a full disk: OSError, or torch.save's RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            previous = _checkpoint_dirs(path.parent.parent)
            raise checkpoint_error(path, exc, previous[-1] if previous else None) from exc
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in _checkpoint_dirs(path.parent.parent)[:-keep]:  # path: out/checkpoints/update-N
            shutil.rmtree(old)

    def load(self, path: Path) -> tuple[int, list[dict]]:
        """Restore a checkpoint; return (updates done, metrics so far)."""
        from safetensors.torch import load_model

        for name in ("policy", "value_model"):
            load_model(self._plain(name), str(path / f"{name}.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True)
        for name in ("policy_opt", "value_opt", "policy_sched", "value_sched", "kl_ctl"):
            getattr(self, name).load_state_dict(state[name])
        return state["update"], json.loads((path / "history.json").read_text())

    def resume(self, out_dir: Path, run_id: str) -> tuple[int, list[dict]]:
        """Restore the last checkpoint in ``out_dir/checkpoints`` if there is one; return (updates
        done, metrics so far), (0, []) without one. Checkpoints of another run (another
        ``run_id``) are removed first, not resumed (see ``training.claim_checkpoints``)."""
        start, history = 0, []
        if self.accelerator.is_main_process:
            claim_checkpoints(out_dir / "checkpoints", run_id)
        self.accelerator.wait_for_everyone()
        checkpoints = _checkpoint_dirs(out_dir)
        if checkpoints:
            start, history = self.load(checkpoints[-1])
            print(f"resuming from {checkpoints[-1]}")
        return start, history


class SigtermCheckpoint(DeferredSigterm):
    """SIGTERM during PPO (``kill``, a preempting or draining scheduler, a stopped container)
    ends the run after the update it is in, with a checkpoint of it, instead of losing every
    update since the last periodic one (``ppo.save_every``).

    While the block runs, a SIGTERM is only noted (``launch.DeferredSigterm``); after each
    update the loop asks ``requested`` (under ``accelerate launch``, whether any process was
    signalled: all of them stop after the same update), saves, and calls ``stop``, which delivers
    the SIGTERM again, so the process ends as it would have. Not in a flow run a Prefect worker
    started: there a cancellation is Prefect's to handle, and the run resumes from its last
    periodic checkpoint. (The processes of a stage launched from such a run are not that run:
    they checkpoint.)"""

    def __init__(self, accelerator: Any) -> None:
        super().__init__()
        self._accelerator = accelerator

    def requested(self) -> bool:
        """Whether this process, or under ``accelerate launch`` any of them, had a SIGTERM: one
        small gather per update, so that every process stops after the same one."""
        if self._accelerator.num_processes == 1:
            return self.received
        flags = self._accelerator.gather(
            torch.tensor([float(self.received)], device=self._accelerator.device)
        )
        return bool(flags.max().item())

    def stop(self) -> None:
        """End this process as the SIGTERM would have (also one that another process had)."""
        self.received = True
        self.release()  # the previous handler's turn (default: exit now)
        raise SystemExit(128 + signal.SIGTERM)  # a handler that returned: end all the same
