"""prefect.yaml's deployments agree with the flows and the CLI they stand beside."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


@pytest.mark.parametrize("name", ["rlhf-retrain", "rlhf-ingest", "rlhf-collect"])
def test_each_deployment_sets_only_parameters_its_flow_takes(name: str) -> None:
    deployment = _deployments()[name]
    signature = inspect.signature(_flow(deployment["entrypoint"]).fn)
    assert set(deployment["parameters"]) <= set(signature.parameters), deployment["parameters"]


def test_the_ingest_deployment_retrains_only_when_asked_as_the_cli_does() -> None:
    """`rlhf ingest` retrains only with --retrain; the deployment's default is the same (a
    batch of ten pairs once started a full-size retrain through it)."""
    from flows.ingest import rlhf_ingest
    from rlhf_tasks.cli import _parser

    deployment = _deployments()["rlhf-ingest"]
    assert deployment["parameters"]["retrain"] is False
    assert inspect.signature(rlhf_ingest.fn).parameters["retrain"].default is False
    assert _parser().parse_args(["ingest", "batch.jsonl"]).retrain is False


def test_the_retrain_an_ingestion_starts_gets_its_params_and_overrides(monkeypatch) -> None:
    import prefect.deployments

    from flows import ingest

    calls = []

    def run_deployment(name, parameters=None, timeout=None):
        calls.append((name, parameters, timeout))
        return SimpleNamespace(id="run-1")

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    run_id = ingest.start_retrain("team/params.yaml", ["ppo.total_episodes=512"])
    assert run_id == "run-1"
    assert calls == [
        (
            "rlhf_pipeline/rlhf-retrain",
            {"params_path": "team/params.yaml", "overrides": ["ppo.total_episodes=512"]},
            0,
        )
    ]
    retrain = _deployments()["rlhf-retrain"]
    assert set(calls[0][1]) <= set(retrain["parameters"])  # parameters the deployment has
