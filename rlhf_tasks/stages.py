"""The pipeline's stages, each declared once, in the order they run.

A stage is a module of ``rlhf_tasks`` named after it, with an entry function
``fn(params, io) -> {"outputs": {...}, "metrics": {...}}``. Its entry in ``STAGES`` says

    entry       the function, as ``module:function`` (imported when the stage runs)
    sections    the ``params.yaml`` sections it reads (its params in dvc.yaml, its MLflow params)
    inputs      role -> path of what it reads: the data, other stages' outputs
    outputs     role -> ``Out`` of what it writes: models and data (cached by DVC), metrics,
                plots and reports (kept in git's place of them, not in DVC's cache)
    trains      it trains a model: it holds a slot of the ``gpu`` concurrency limit, its
                checkpoints (``artifacts/<stage>/checkpoints``) are removed once it is tracked,
                and its ``resources.num_processes`` may run it under ``accelerate launch``
    registers   the transformers task of the model it logs to MLflow and ``promote`` registers
    cached      whether an unchanged stage may be skipped (``promote`` never is: its decision
                depends on the registry, not only on files)

Everything else reads this list: the Prefect flow and ``rlhf run`` (``rlhf_tasks/runner.py``),
``rlhf stage NAME``, ``accelerate launch`` (``launch.py``), the preflight, promote's
registration, the lineage of each MLflow run, and ``dvc.yaml``, which is generated from it
(``rlhf dvc-yaml``; ``tests/code/test_stages.py`` fails when the committed file differs).

A stage's code dependencies are not listed by hand: ``code_deps`` follows what its module
imports inside the project, transitively, so a change to ``reward.score`` re-runs every stage
that scores. The runner hands each stage its input and output locations (``StageIO``); no stage
imports another to find its paths. Adding a stage: a module, an entry here and a params section.

This module imports no stage: it is read by the CLI in milliseconds. The stages import only
``StageIO`` (``rlhf_tasks/locations.py``), not this module, so that editing the registry does
not count as a change to every stage's code.
"""

from __future__ import annotations

import ast
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_tasks.config import Params
from rlhf_tasks.locations import StageIO

ARTIFACTS = Path("artifacts")
PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_PACKAGES = ("rlhf_tasks", "flows")  # whose modules count as project code


@dataclass(frozen=True)
class Out:
    """A stage output. ``cache=False``: DVC records its hash but keeps it out of its cache (small
    files that change with each run: metrics, reports). ``metric``: a DVC metric (flat JSON);
    ``plot``: a DVC plot, with its ``x`` and ``y`` columns."""

    path: str
    cache: bool = True
    metric: bool = False
    plot: tuple[str, str] | None = None


def metric(path: str) -> Out:
    return Out(path, cache=False, metric=True)


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str
    sections: tuple[str, ...]
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Out] = field(default_factory=dict)
    trains: bool = False
    registers: str | None = None
    cached: bool = True
    # The params section whose ``resources`` and ``args`` configure the trainer (training stages).
    trainer_section: Callable[[Params], str] | None = None

    @property
    def workdir(self) -> Path:
        return ARTIFACTS / self.name

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    def function(self) -> Callable[[Params, StageIO], dict[str, Any]]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)

    def io(self, root: Path = Path(), out_root: Path | None = None, **hooks: Any) -> StageIO:
        """The stage's locations under the project directory ``root`` (its outputs under
        ``out_root`` instead, when given: a benchmark's scratch directory)."""
        out_root = root if out_root is None else out_root
        return StageIO(
            inputs={role: root / path for role, path in self.inputs.items()},
            outputs={role: out_root / out.path for role, out in self.outputs.items()},
            workdir=out_root / self.workdir,
            **hooks,
        )

    def upstream(self) -> list[str]:
        """The stages whose outputs this one reads, in pipeline order."""
        mine = [Path(p) for p in self.inputs.values()]
        return [
            other.name
            for other in STAGES.values()
            if other.name != self.name
            and any(_within(p, Path(o.path)) for p in mine for o in other.outputs.values())
        ]

    def deps(self) -> list[str]:
        """Its deps in dvc.yaml: its inputs, then its code."""
        return [*self.inputs.values(), *code_deps(self.module)]

    def metrics_file(self) -> str | None:
        return next((out.path for out in self.outputs.values() if out.metric), None)


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _trained_by(section: str) -> Callable[[Params], str]:
    return lambda params: section


VALIDATED = "artifacts/validate/data"

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "base_model",
            "rlhf_tasks.base_model:build",
            sections=("model", "base_model"),
            outputs={"model": Out("artifacts/base_model")},
        ),
        Stage(
            "validate",
            "rlhf_tasks.validate:run",
            sections=("data", "model", "validate"),
            inputs={"data": "data", "tokenizer": "artifacts/base_model"},
            outputs={"data": Out(VALIDATED), "report": metric("artifacts/validate/report.json")},
        ),
        Stage(
            "sft",
            "rlhf_tasks.sft:run",
            sections=("model", "sft"),
            inputs={"sft_train": f"{VALIDATED}/sft_train.jsonl", "base": "artifacts/base_model"},
            outputs={
                "model": Out("artifacts/sft/model"),
                "metrics": metric("artifacts/sft/metrics.json"),
            },
            trains=True,
            trainer_section=_trained_by("sft"),
        ),
        Stage(
            "reward",
            "rlhf_tasks.reward:run",
            sections=("model", "reward", "judge"),
            inputs={
                "preferences_train": f"{VALIDATED}/preferences_train.jsonl",
                "preferences_heldout": f"{VALIDATED}/preferences_heldout.jsonl",
                "sft_model": "artifacts/sft/model",
            },
            outputs={
                "model": Out("artifacts/reward/model"),
                "metrics": metric("artifacts/reward/metrics.json"),
            },
            trains=True,
            registers="text-classification",
            trainer_section=_trained_by("reward"),
        ),
        Stage(
            "judge",
            "rlhf_tasks.judge:run",
            sections=("model", "reward", "judge"),
            inputs={
                "preferences_train": f"{VALIDATED}/preferences_train.jsonl",
                "preferences_heldout": f"{VALIDATED}/preferences_heldout.jsonl",
                "sft_model": "artifacts/sft/model",
            },
            outputs={
                "model": Out("artifacts/judge/model"),
                "metrics": metric("artifacts/judge/metrics.json"),
            },
            trains=True,
            trainer_section=_trained_by("reward"),
        ),
        Stage(
            "policy",
            "rlhf_tasks.policy:run",
            sections=("model", "policy", "ppo", "rloo", "grpo", "dpo"),
            inputs={
                "prompts_rl": f"{VALIDATED}/prompts_rl.jsonl",
                "preferences_train": f"{VALIDATED}/preferences_train.jsonl",
                "sft_model": "artifacts/sft/model",
                "reward_model": "artifacts/reward/model",
            },
            outputs={
                "model": Out("artifacts/policy/model"),
                "metrics": metric("artifacts/policy/metrics.json"),
                "history": Out(
                    "artifacts/policy/history.jsonl",
                    cache=False,
                    plot=("episode", "objective/scores"),
                ),
            },
            trains=True,
            registers="text-generation",
            trainer_section=lambda params: params.policy.algorithm,
        ),
        Stage(
            "evaluate",
            "rlhf_tasks.evaluate:run",
            sections=("model", "evaluate"),
            inputs={
                "prompts_heldout": f"{VALIDATED}/prompts_heldout.jsonl",
                "preferences_heldout": f"{VALIDATED}/preferences_heldout.jsonl",
                "sft_model": "artifacts/sft/model",
                "reward_model": "artifacts/reward/model",
                "judge_model": "artifacts/judge/model",
                "policy_model": "artifacts/policy/model",
                "history": "artifacts/policy/history.jsonl",
            },
            outputs={
                "report": Out("artifacts/evaluate/report.md", cache=False),
                "generations": Out("artifacts/evaluate/generations.jsonl", cache=False),
                "reward_plot": Out("artifacts/evaluate/reward_model_scores.png", cache=False),
                "kl_plot": Out("artifacts/evaluate/reward_kl.png", cache=False),
                "metrics": metric("artifacts/evaluate/metrics.json"),
            },
        ),
        Stage(
            "promote",
            "rlhf_tasks.promote:run",
            sections=("model", "policy", "evaluate", "promote", "tracking"),
            inputs={
                "validation": "artifacts/validate/report.json",
                "prompts_heldout": f"{VALIDATED}/prompts_heldout.jsonl",
                "reward_model": "artifacts/reward/model",
                "judge_model": "artifacts/judge/model",
                "policy_model": "artifacts/policy/model",
                "evaluation": "artifacts/evaluate/metrics.json",
                "generations": "artifacts/evaluate/generations.jsonl",
            },
            cached=False,
        ),
    )
}


def get(name: str) -> Stage:
    return STAGES[name]


def call(name: str, params: Params, root: Path = Path(), **io: Any) -> dict[str, Any]:
    """Run stage ``name``'s function on its registry locations under ``root``, untracked (the
    runner adds tracking and DVC; tests and benchmarks call this). ``io``: ``Stage.io``'s."""
    stage = STAGES[name]
    return stage.function()(params, stage.io(root, **io))


# -- code dependencies -------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = PACKAGE_ROOT.parent.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(module: str) -> set[str]:
    """The project modules that ``module`` imports, at the top or inside functions:
    ``import a.b``, ``from a import b`` (module b) and ``from a.b import name``."""
    path = _module_file(module)
    if path is None:
        return set()
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names]
            names = [n if _module_file(n) else base for n in names]
        else:
            continue
        found.update(n for n in names if _module_file(n) and n != module)
    return found


@functools.cache
def code_deps(module: str) -> tuple[str, ...]:
    """The files of ``module`` and of every project module it imports, transitively, as paths
    relative to the project directory, sorted. The bare package ``rlhf_tasks`` (a docstring)
    is left out."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(imported_modules(current) - seen)
    files = {_module_file(m) for m in seen if m not in PROJECT_PACKAGES}
    root = PACKAGE_ROOT.parent
    return tuple(sorted(str(f.relative_to(root)) for f in files if f is not None))


# -- dvc.yaml ----------------------------------------------------------------------------------

DVC_YAML_HEADER = """\
# Generated from rlhf_tasks/stages.py by `rlhf dvc-yaml`: edit the registry, not this file.
# The pipeline's stages for `dvc repro` / `dvc exp run` / `dvc status`. `rlhf run` records each
# stage it runs in dvc.lock and DVC's cache as `dvc commit` would, so both agree.
"""


def dvc_yaml() -> str:
    """The text of ``dvc.yaml`` for this registry."""
    import yaml

    stages: dict[str, Any] = {}
    for stage in STAGES.values():
        entry: dict[str, Any] = {"cmd": f"rlhf stage {stage.name}"}
        entry["deps"] = stage.deps()
        entry["params"] = list(stage.sections)
        outs, metrics, plots = [], [], []
        for out in stage.outputs.values():
            if out.metric:
                metrics.append({out.path: {"cache": False}})
            elif out.plot:
                x, y = out.plot
                plots.append({out.path: {"cache": False, "x": x, "y": y}})
            else:
                outs.append(out.path if out.cache else {out.path: {"cache": False}})
        for key, value in (("outs", outs), ("metrics", metrics), ("plots", plots)):
            if value:
                entry[key] = value
        stages[stage.name] = entry
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=100)
    return DVC_YAML_HEADER + body
