"""Shared fixtures: offline environment, a tiny base model and the demo data, built once."""

from __future__ import annotations

import contextlib
import os
import secrets as secrets_module
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ[_var] = _value

from helpers import make_project, write_validated  # noqa: E402

from rlhf_tasks import base_model, demo  # noqa: E402
from rlhf_tasks.cli import main  # noqa: E402
from rlhf_tasks.config import DataConfig, DemoConfig, ModelConfig, Params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# The modules whose tests read the session's demo run. Under pytest-xdist (`make test` runs two
# workers) they all go to one worker, so that the demo pipeline runs once, and first, as the
# longest piece of work; every other module goes whole to one worker (its module-scoped runs
# are shared as without xdist).
DEMO_RUN_MODULES = (
    "tests/data/test_dvc.py",
    "tests/model/test_demo_quality.py",
    "tests/registry/test_demo_registry.py",
    "tests/reliability/test_security.py",
    "tests/flows/test_collect.py",
)


# The longest modules after the demo run's, longest first: their tests' seconds in one
# `make test` here (2026-12-07): 141, 110, 99, 84, 79, 77, 76, 69, 47. A worker takes the next
# module when it is nearly idle, so a long module handed out last would leave the other worker
# idle at the end; longest first keeps the two workers' finishing times close.
LONGEST_MODULES = (
    "tests/flows/test_team_scale.py",
    "tests/reliability/test_killed_runs.py",
    "tests/flows/test_pipeline_flow.py",
    "tests/reliability/test_bad_input.py",
    "tests/registry/test_promote.py",
    "tests/data/test_gate.py",
    "tests/reliability/test_outages.py",
    "tests/flows/test_ingest.py",
    "tests/code/test_launch.py",
)


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _schedule_rank(nodeid: str) -> int:
    """0 for the demo run's modules, 1... for LONGEST_MODULES in order, then the rest."""
    module = _module(nodeid)
    if module in DEMO_RUN_MODULES:
        return 0
    if module in LONGEST_MODULES:
        return 1 + LONGEST_MODULES.index(module)
    return 1 + len(LONGEST_MODULES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads the session's demo run (``demo_run``: the whole pipeline, minutes) is
    slow, marked or not: ``-m "not slow"`` never starts it. On an xdist worker, the demo run's
    modules are collected first, then LONGEST_MODULES (the scheduler hands out modules in
    collection order)."""
    if stale := [m for m in DEMO_RUN_MODULES + LONGEST_MODULES if not (ROOT / m).is_file()]:
        raise pytest.UsageError(f"tests/conftest.py names modules that do not exist: {stale}")
    for item in items:
        if "demo_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            if _module(item.nodeid) not in DEMO_RUN_MODULES:
                raise pytest.UsageError(
                    f"{item.nodeid} reads demo_run: add its module to DEMO_RUN_MODULES"
                )
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: _schedule_rank(item.nodeid))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist's scheduling by module, with the demo run's modules as one unit, in
    collection order. (Its own ``--dist loadgroup`` does not group under pytest 9.2: it renames
    node ids, which pytest 9 no longer lets a plugin do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "demo_run" if module in DEMO_RUN_MODULES else module

    config.option.loadscopereorder = False  # collection order: the demo run first
    return ByModule(config, log)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny base model (tokenizer + random-init Llama), built once per session."""
    out = tmp_path_factory.mktemp("base_model")
    base_model.build_in(Params(model=ModelConfig(name_or_path=str(out))), out)
    return out


# Environment variables that hold secrets, each given a random canary value for the demo run:
# tests/reliability/test_security.py checks that none reaches MLflow or the run's artifacts.
SECRET_VARS = (
    "HF_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


@dataclass(frozen=True)
class DemoRun:
    clone: Path  # a fresh clone of the repo after `rlhf data demo --check` and `rlhf run`
    stdout: str  # what `rlhf run` printed
    secrets: dict[str, str]  # the canary value of each of SECRET_VARS the run had


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The whole demo pipeline with the default params.yaml, as `make demo` runs it on a fresh
    clone (only git-tracked files; the demo data regenerated; the Prefect flow with MLflow's
    embedded store): built once per session, shared by the DVC test (its outputs are the ones
    dvc.lock records), the model-quality tests (tests/model), the registry tests and the secret
    scan. It runs with a random canary value in each of SECRET_VARS, as a user's shell may hold
    real ones. (Under xdist it runs on one worker while the other runs the rest: `make test`
    gives each process one torch thread, as two workers' threads on 2 cores would otherwise
    make each several times slower.)"""
    from helpers import BIN, fresh_clone, sh

    clone = fresh_clone(tmp_path_factory.mktemp("demo_run") / "clone")
    secrets = {var: f"canary-{var.lower()}-{secrets_module.token_hex(12)}" for var in SECRET_VARS}
    sh(BIN / "rlhf", "data", "demo", "--check", cwd=clone, code=clone, extra_env=secrets)
    run = sh(BIN / "rlhf", "run", cwd=clone, code=clone, extra_env=secrets)
    return DemoRun(clone, run.stdout, secrets)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the demo data set under data/, generated once per session."""
    root = tmp_path_factory.mktemp("demo")
    demo.generate(DemoConfig(), DataConfig(), root=root)
    return root


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow store with its schema and nothing else, made once: each project starts with a
    copy instead of running MLflow's schema migrations again (about 3 s each). Projects made by
    ``fresh_clone`` (the demo run, ingestion, DVC) create theirs as a user's first run does."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def project(
    tmp_path: Path,
    base_model_dir: Path,
    demo_root: Path,
    empty_mlflow_db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """A project directory (the repo's params.yaml, the demo data, the tiny model, an empty
    MLflow store) as cwd."""
    make_project(tmp_path, base_model_dir, demo_root, empty_mlflow_db)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own mlflow.db
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def module_project(
    tmp_path_factory: pytest.TempPathFactory,
    base_model_dir: Path,
    demo_root: Path,
    empty_mlflow_db: Path,
):
    """For a module-scoped fixture that runs a stage once for several tests to read:
    ``with module_project("sft") as root:`` gives a new project directory (as ``project`` makes
    it), the cwd inside the block. Tests that change it work on a copy (``copy_project``)."""

    @contextlib.contextmanager
    def enter(name: str) -> Iterator[Path]:
        root = make_project(
            tmp_path_factory.mktemp(name), base_model_dir, demo_root, empty_mlflow_db
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            mp.chdir(root)
            yield root

    return enter


@pytest.fixture
def copy_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``copy_project(root)``: a copy of the project directory ``root`` as cwd, for a test to
    change (as ``project``, it is the test's own)."""

    def copy(root: Path) -> Path:
        dest = tmp_path / "project"
        shutil.copytree(root, dest, symlinks=True)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.chdir(dest)
        return dest

    return copy


@pytest.fixture
def validated(project: Path):
    """Write the demo data where the validation gate leaves it for the training stages
    (``artifacts/validate/data/<name>.jsonl``), the first rows of each data set:
    ``validated(sft=64, pairs=64, heldout=32, prompts=32)``; ``None`` keeps every row."""

    def write(
        sft: int | None = 64,
        pairs: int | None = 64,
        heldout: int | None = 32,
        prompts: int | None = 32,
    ) -> Path:
        return write_validated(project, sft, pairs, heldout, prompts)

    return write


def _console_handlers_to_current_stderr() -> None:
    """Prefect's console log handlers write to the ``sys.stderr`` of the first flow run of the
    process; under pytest that is an earlier test's captured stream, closed since. Each `rlhf`
    command is a process of its own for users: here its handlers write to this test's stderr."""
    import logging
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one
                handler.console.file = sys.stderr


@pytest.fixture
def rlhf(capsys: pytest.CaptureFixture[str]):
    """Run the ``rlhf`` CLI in-process: ``code, out, err = rlhf("validate", "x.jsonl")``."""

    def run(*argv: str) -> tuple[int, str, str]:
        _console_handlers_to_current_stderr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
