"""Helpers for tests that run the real ``rlhf`` and ``dvc`` executables in scratch git repos."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: dvc, rlhf


def env(code: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a command; ``code``: run that checkout's rlhf_tasks, not the installed
    (editable) one, as a fresh clone's `dvc repro` would; ``extra``: variables to add."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # each project its own embedded store
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return {**env, **(extra or {})}


def sh(
    *cmd: str | Path,
    cwd: Path,
    check: bool = True,
    code: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on an unexpected failure, show its output in the assertion."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env(code, extra_env),
        capture_output=True,
        text=True,
        timeout=1800,  # the whole demo pipeline, on a slow machine
    )
    if check:
        assert proc.returncode == 0, (
            f"`{' '.join(map(str, cmd))}` exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def fresh_clone(dest: Path) -> Path:
    """The repo's git-tracked files as they are in the working tree, committed in a new repo."""
    listed = sh("git", "-C", ROOT, "ls-files", "-z", cwd=ROOT).stdout.split("\0")
    files = [f for f in listed if f and (ROOT / f).is_file()]
    assert "data.dvc" in files and "dvc.lock" in files and "params.yaml" in files
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "-m", "fresh clone", cwd=dest)
    assert not (dest / "data").exists(), "data/ must come from the generator, not from git"
    return dest


def make_project(
    dest: Path, base_model_dir: Path, demo_root: Path, mlflow_db: Path | None = None
) -> Path:
    """A project directory in ``dest``: the repo's params.yaml (pointing at the tiny base
    model), its dvc.yaml and the demo data; with ``mlflow_db``, a copy of that empty MLflow
    store as the project's own (creating one takes seconds of schema migrations)."""
    shutil.copytree(demo_root / "data", dest / "data")
    if mlflow_db is not None:
        shutil.copy(mlflow_db, dest / "mlflow.db")
    shutil.copy(ROOT / "dvc.yaml", dest)  # the stages' params sections and deps
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name_or_path"] = str(base_model_dir)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def make_dvc_repo(project: Path) -> Path:
    """Make ``project`` a DVC repository with the stages' code (dvc.yaml's deps), as a user's
    project is: DVC then decides which stages a run reuses, from what dvc.lock records."""
    shutil.copytree(
        ROOT / "rlhf_tasks", project / "rlhf_tasks", ignore=shutil.ignore_patterns("__pycache__")
    )
    sh(BIN / "dvc", "init", "--no-scm", "-q", cwd=project)
    return project


def write_validated(
    project: Path,
    sft: int | None = 64,
    pairs: int | None = 64,
    heldout: int | None = 32,
    prompts: int | None = 32,
) -> Path:
    """The first rows of each demo data set where the validation gate leaves them for the
    training stages (``artifacts/validate/data/<name>.jsonl``); ``None`` keeps every row."""
    from rlhf_tasks import data
    from rlhf_tasks.config import DataConfig
    from rlhf_tasks.stages import STAGES

    d, out = DataConfig(), project / STAGES["validate"].outputs["data"].path
    for name, path, rows in (
        ("sft_train", d.sft_train, sft),
        ("preferences_train", d.preferences_train, pairs),
        ("preferences_heldout", d.preferences_heldout, heldout),
        ("prompts_rl", d.prompts_rl, prompts),
        ("prompts_heldout", d.prompts_heldout, prompts),
    ):
        frame = data.load([project / path]).frame
        data.write_jsonl(frame if rows is None else frame.head(rows), out / f"{name}.jsonl")
    return out


# Rows kept of each demo data set by ``shrink_data`` (held-out prompts stay disjoint from the
# training prompts): what a test of wiring needs, a few seconds less of reading, validating,
# tokenising and scoring per run than the whole demo data set.
ROWS = {
    "data/sft/train.jsonl": 160,
    "data/preferences/train.jsonl": 160,
    "data/preferences/heldout.jsonl": 48,
    "data/prompts/rl.jsonl": 48,
    "data/prompts/heldout.jsonl": 16,
}


def shrink_data(project: Path) -> Path:
    """Keep the first ``ROWS`` rows of each demo data set in ``project`` (run with
    ``validate.min_rows`` at most 16, as FEW_STEPS sets it)."""
    for rel, rows in ROWS.items():
        path = project / rel
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[:rows]), encoding="utf-8")
    return project


def set_params(project: Path, overrides: list[str]) -> None:
    """Write ``section.key=value`` settings into the project's params.yaml, as a user edits it
    (DVC records, and later skips, only runs with params.yaml's values)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        section = params
        for name in parents:
            section = section.setdefault(name, {})
        section[leaf] = yaml.safe_load(value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# The training stages for a few steps, for tests of wiring (flows, deployments), not training.
FEW_STEPS = [
    "validate.min_rows=10",
    "sft.args.max_steps=2",
    "reward.args.max_steps=2",
    "ppo.total_episodes=16",
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=8",
    "ppo.ppo_epochs=1",
    "ppo.response_length=8",
    "evaluate.samples_per_prompt=1",
    "evaluate.max_new_tokens=8",
]


# The demo's registered model names.
POLICY, REWARD = "rlhf-demo-policy", "rlhf-demo-reward"

# What evaluate writes for a policy that beat SFT within every guard rail.
GOOD_EVALUATION = {
    "judge/win_rate_vs_sft": 0.66,
    "gold/win_rate_vs_sft": 0.66,
    "policy/kl_to_sft": 2.0,
    "policy/reward_mean": 2.5,
    "reward_model/accuracy": 0.86,
    "checks/kl_within_budget": 1.0,
    "checks/no_degeneration": 1.0,
}


def hold_project(seconds: float = 600) -> subprocess.Popen:
    """Another process that holds the project for ``seconds`` (once it has printed "held")."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from rlhf_tasks.projectlock import hold\n"
            f"with hold('`rlhf run`'):\n    print('held', flush=True); time.sleep({seconds})\n"
            "print('released', flush=True)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


# PostgreSQL on 127.0.0.1 (trust auth), as CI and the developers' machines run it.
PG = {"host": "127.0.0.1", "port": 5432, "user": os.environ.get("RLHF_TEST_PGUSER", "postgres")}


def postgres_up() -> bool:
    try:
        with socket.create_connection((PG["host"], PG["port"]), timeout=2):
            return True
    except OSError:
        return False


def pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", **PG)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextlib.contextmanager
def pg_databases(*roles: str) -> Iterator[dict[str, str]]:
    """A new PostgreSQL database per role ({role: name}), dropped at the end (a test skips,
    saying so, where no PostgreSQL answers on 127.0.0.1:5432: a laptop; CI always has one)."""
    import pytest

    if not postgres_up():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432: this test needs one")
    suffix = uuid.uuid4().hex[:10]
    names = {role: f"rlhf_{role}_{suffix}" for role in roles}
    try:
        for name in names.values():
            pg_admin(f"CREATE DATABASE {name}")
        yield names
    finally:
        for name in names.values():
            pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# Two prompts, each with two answers by a model "m/1": tasks for the collection tests
# (``collect.tasks(params, ANSWERS)``), one clearly better answer in each.
ANSWERS = {
    "Tell me about dogs in winter.": [
        ("Dogs love snow. Most dogs enjoy a walk. They are lovely.", "m/1"),
        ("dogs are", "m/1"),
    ],
    "Tell me about cats at night.": [
        ("Cats hunt at night. Many cats sleep all day. They are great.", "m/1"),
        ("I do not know much about cats.", "m/1"),
    ],
}
