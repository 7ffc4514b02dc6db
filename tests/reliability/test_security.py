"""Security by default: a model's own code runs only if the user trusts it, only safetensors
weights load unless pickles are allowed, the servers the project starts listen on 127.0.0.1 only,
secrets in the environment never reach MLflow, and data paths do not silently leave the project.

The secret scan reads what the session's demo run (tests/conftest.py, ``demo_run``: the whole
pipeline on a fresh clone, with canary values in the secret variables) left behind."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest

from rlhf_tasks import preflight, reward
from rlhf_tasks.config import ModelConfig, Params, load_params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.stages import STAGES
from rlhf_tasks.tracking import lineage, logged_models, runs, store

ROOT = Path(__file__).resolve().parents[2]


def _check(project: Path, *overrides: str) -> None:
    preflight.check(load_params(project / "params.yaml", list(overrides)))


# -- a model's own code runs only if the user trusts it --------------------------------------------


def _with_code(base_model_dir: Path, dest: Path, how: str) -> Path:
    model = Path(shutil.copytree(base_model_dir, dest))
    if how == "auto_map":  # what transformers imports with trust_remote_code
        config = json.loads((model / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
        (model / "config.json").write_text(json.dumps(config))
    else:
        (model / "modeling_custom.py").write_text("import os\n")
    return model


@pytest.mark.parametrize("how", ["auto_map", "py_file"])
@pytest.mark.parametrize("key", ["model.name_or_path", "reward.init_from", "evaluate.judge"])
def test_a_model_that_ships_code_is_refused_unless_trusted(
    project: Path, base_model_dir: Path, key: str, how: str
):
    _with_code(base_model_dir, project / "custom", how)
    with pytest.raises(ConfigError) as exc:
        _check(project, f"{key}=custom")
    message = str(exc.value)
    assert message.startswith(f"{key}='custom': the model ships its own code (")
    assert ("auto_map in config.json" if how == "auto_map" else "modeling_custom.py") in message
    assert "model.trust_remote_code=true" in message
    _check(project, f"{key}=custom", "model.trust_remote_code=true")  # the user's decision


def test_trust_remote_code_is_off_by_default() -> None:
    assert ModelConfig().trust_remote_code is False
    assert load_params(ROOT / "params.yaml").model.trust_remote_code is False


# -- only safetensors weights load, unless the user allows pickles ----------------------------


def test_allow_pickle_is_off_by_default_and_documented_in_params_yaml() -> None:
    assert ModelConfig().allow_pickle is False
    assert load_params(ROOT / "params.yaml").model.allow_pickle is False
    lines = (ROOT / "params.yaml").read_text().splitlines()
    assert "#" in next(li for li in lines if "allow_pickle" in li)  # with what it does


@pytest.fixture(scope="module")
def pickled_model(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model with its weights as a pickle (pytorch_model.bin) and no safetensors.
    transformers 5 always saves safetensors (save_pretrained has no safe_serialization), so the
    pickle is written as older tools wrote it: torch.save of the state dict."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(shutil.copytree(base_model_dir, tmp_path_factory.mktemp("pickled") / "model"))
    (out / "model.safetensors").unlink()
    state = AutoModelForCausalLM.from_pretrained(base_model_dir).state_dict()
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_a_model_with_only_pickled_weights_is_refused_up_front(project: Path, pickled_model: Path):
    with pytest.raises(ConfigError) as exc:
        _check(project, f"model.name_or_path={pickled_model}")
    message = str(exc.value)
    assert message.startswith(f"model.name_or_path='{pickled_model}': its weights are pickles")
    assert "pytorch_model.bin" in message and "model.allow_pickle=true" in message
    _check(project, f"model.name_or_path={pickled_model}", "model.allow_pickle=true")


def test_a_pickle_in_the_hub_cache_is_refused_offline(
    project: Path, pickled_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--pickled"
    shutil.copytree(pickled_model, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"'acme/pickled' \(in the HF cache\): its weights are"):
        _check(project, "model.name_or_path=acme/pickled")


def test_the_loaders_refuse_pickled_weights_unless_allowed(pickled_model: Path):
    """Not only the preflight: a load itself asks for safetensors (``use_safetensors=True``)."""
    with pytest.raises(OSError, match=r"model\.safetensors"):
        reward.load_reward_model(pickled_model)
    model, _ = reward.load_reward_model(pickled_model, ModelConfig(allow_pickle=True))
    assert model is not None


def test_trl_loads_its_model_by_the_same_rules(validated, project: Path, pickled_model: Path):
    """The training stages give TRL a model path; TRL loads it with ``model_init_kwargs``."""
    from rlhf_tasks import sft

    validated(sft=8)
    params = load_params("params.yaml", [f"model.name_or_path={pickled_model}"])
    with pytest.raises(OSError, match=r"model\.safetensors"):
        sft.build_trainer(params, STAGES["sft"].io())


def test_every_trl_config_carries_the_loading_rules(project: Path):
    for algorithm in ("rloo", "grpo", "dpo"):
        configs = preflight.trainer_configs(
            load_params("params.yaml", [f"policy.algorithm={algorithm}"])
        )
        assert set(configs) == {"sft", "reward", algorithm}
        for cfg in configs.values():
            # fp32 master weights whatever the checkpoint's dtype (a bf16 one would train bf16).
            assert cfg.model_init_kwargs == {"dtype": "float32", "use_safetensors": True}
            assert cfg.trust_remote_code is False
    allowed = preflight.trainer_configs(
        load_params(
            "params.yaml",
            [
                "model.allow_pickle=true",
                "model.trust_remote_code=true",
                "sft.args.model_init_kwargs={dtype: bfloat16}",
            ],
        )
    )
    assert allowed["sft"].model_init_kwargs == {"dtype": "bfloat16"}  # the user's own kept
    assert allowed["sft"].trust_remote_code is True
    assert allowed["reward"].model_init_kwargs == {"dtype": "float32"}


@pytest.mark.parametrize(
    ("key", "param"),
    [("use_safetensors", "model.allow_pickle"), ("trust_remote_code", "model.trust_remote_code")],
)
def test_model_init_kwargs_cannot_override_the_rules(project: Path, key: str, param: str):
    with pytest.raises(ConfigError, match=rf"sft\.args\.model_init_kwargs\.{key}: set {param}"):
        _check(project, f"sft.args.model_init_kwargs={{{key}: false}}")


def test_every_model_load_in_the_code_passes_the_rules() -> None:
    """Each ``from_pretrained`` in rlhf_tasks/: a model's takes ``**model_kwargs(...)`` (remote
    code and pickles as params allow), a tokenizer's or config's ``trust_remote_code``."""
    calls = []
    for path in sorted((ROOT / "rlhf_tasks").rglob("*.py")):  # the subpackages too (ppo/)
        where = path.relative_to(ROOT / "rlhf_tasks")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                calls.append((f"{where}:{node.lineno}", ast.unparse(node.func.value), node))
    assert len(calls) >= 10
    for where, receiver, call in calls:
        keywords = {k.arg for k in call.keywords}
        if "Tokenizer" in receiver or "Config" in receiver:
            assert "trust_remote_code" in keywords, where
        elif where.startswith("pyfunc.py:"):
            # The registered models' loader imports nothing of the project (no params): it
            # loads the pipeline's own safetensors, which log_model checked, and never code.
            assert "use_safetensors" in keywords and "trust_remote_code" not in keywords, where
        else:
            assert None in keywords, f"{where}: {receiver}.from_pretrained without **model_kwargs"
            assert "trust_remote_code" not in keywords, where


# -- servers listen on 127.0.0.1 only -----------------------------------------------------------


# The temporary Prefect API that `rlhf run` and `rlhf ingest` start listens on 127.0.0.1 only:
# checked while its server runs, in tests/flows/test_api.py (test_a_killed_run_leaves_no_server_
# behind; one server start fewer than a test of its own here).


# -- secrets never reach MLflow ------------------------------------------------------------------


def _mlflow_texts(clone: Path) -> dict[str, str]:
    """Every param, tag, name and description MLflow recorded in the clone's store."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    texts: dict[str, str] = {}
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for exp in experiments:
        texts[f"experiment {exp.name}"] = json.dumps([exp.name, exp.tags, exp.artifact_location])
        for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
            texts[f"run {run.info.run_id}"] = json.dumps(
                [run.info.run_name, run.data.params, run.data.tags]
            )
        for model in client.search_logged_models([exp.experiment_id]):
            texts[f"logged model {model.model_id}"] = json.dumps(
                [model.name, model.params, model.tags, model.source_run_id]
            )
    for rm in client.search_registered_models():
        texts[f"registered model {rm.name}"] = json.dumps([rm.tags, rm.description, rm.aliases])
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            texts[f"{rm.name}/{mv.version}"] = json.dumps([mv.tags, mv.description, mv.source])
    assert any(k.startswith("run ") for k in texts) and any("/" in k for k in texts)
    return texts


def _files(clone: Path) -> dict[str, bytes]:
    """The raw bytes of the store, of every file MLflow keeps (mlruns/) and of artifacts/."""
    files = {"mlflow.db": (clone / "mlflow.db").read_bytes()}
    for top in ("mlruns", "artifacts"):
        for path in sorted((clone / top).rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[str(path.relative_to(clone))] = path.read_bytes()
    assert any(name.startswith("mlruns/") for name in files)
    return files


def _leaks(secrets: dict[str, str], texts: dict[str, str], files: dict[str, bytes]) -> list[str]:
    found = []
    for var, value in secrets.items():
        found += [f"{var} in {where}" for where, text in texts.items() if value in text]
        found += [f"{var} in {name}" for name, data in files.items() if value.encode() in data]
    return found


def test_the_secret_scan_finds_a_planted_secret(tmp_path: Path) -> None:
    """The scan itself can fail: a canary in any of the places it reads is found."""
    secrets = {"HF_TOKEN": "canary-planted"}
    assert _leaks(secrets, {"run x": '{"token": "canary-planted"}'}, {}) == ["HF_TOKEN in run x"]
    assert _leaks(secrets, {}, {"mlruns/1/a.json": b"..canary-planted.."}) == [
        "HF_TOKEN in mlruns/1/a.json"
    ]


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_mlflow(demo_run) -> None:
    assert demo_run.secrets and all(v.startswith("canary-") for v in demo_run.secrets.values())
    leaks = _leaks(demo_run.secrets, _mlflow_texts(demo_run.clone), _files(demo_run.clone))
    run_out = demo_run.stdout
    leaks += [f"{var} in rlhf run's output" for var, v in demo_run.secrets.items() if v in run_out]
    assert not leaks


def test_urls_are_recorded_without_their_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret-pw@mlflow.example:5000")
    runs.record_run("policy", run_id="abc", tracking_uri=store.tracking_uri())
    record = (runs.RUNS_DIR / "policy.json").read_text()
    assert "s3cret-pw" not in record and "alice" not in record
    assert json.loads(record)["tracking_uri"] == "https://mlflow.example:5000"

    # A DVC remote with a token in its URL: the lineage tag every run carries.
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = team\n"
        "['remote \"team\"']\n    url = https://bob:t0ken-xyz@dvc.example/store?token=t0ken-abc\n"
    )
    remote = lineage.lineage(Params())["rlhf.dvc_remote"]
    assert remote == "team: https://dvc.example/store?token=***"

    # The link to the MLflow run in Prefect's evaluation artifact.
    from flows import reports

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://carol:db-pw@db.example/mlflow")
    assert reports._run_link("r1") == "`r1` (postgresql://db.example/mlflow)"


@pytest.mark.slow
def test_a_registered_model_is_checked_before_mlflow_loads_it(
    demo_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`promote` (the champion) and `rlhf generate` load registered models through MLflow, whose
    loader would run a model's code or unpickle it without asking: they are checked first."""
    import mlflow

    monkeypatch.chdir(demo_run.clone)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{demo_run.clone / 'mlflow.db'}")
    try:
        uri = "models:/rlhf-demo-policy/1"
        components = logged_models.load_logged_model(
            uri
        )  # the pipeline's own: safetensors, no code
        assert {"model", "tokenizer"} <= set(components)

        artifacts = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        for tamper in ("code", "pickle"):
            copy = Path(shutil.copytree(artifacts, tmp_path / tamper))
            if tamper == "code":
                (copy / "artifacts/model/modeling_custom.py").write_text("import os\n")
            else:
                weights = copy / "artifacts/model/model.safetensors"
                weights.rename(weights.with_name("pytorch_model.bin"))
            monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda c=copy, **_: str(c))
            with pytest.raises(ConfigError, match=r"^models:/rlhf-demo-policy/1: "):
                logged_models.load_logged_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)


# -- data paths do not silently leave the project --------------------------------------------------


@pytest.mark.parametrize(
    "key", ["dir", "preferences_train", "preferences_heldout", "sft_train", "prompts_rl"]
)
def test_a_relative_data_path_out_of_the_project_is_refused(project: Path, key: str):
    with pytest.raises(ConfigError) as exc:
        load_params(project / "params.yaml", [f"data.{key}=../elsewhere/train.jsonl"])
    assert str(exc.value).startswith(
        f"-S: data.{key}: '../elsewhere/train.jsonl' is outside the project directory ({project})"
    )


def test_the_params_file_is_named_when_it_holds_the_path(project: Path):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  dir: data", "  dir: data/../../shared"))
    with pytest.raises(ConfigError, match=rf"^{project / 'params.yaml'}: data\.dir: "):
        load_params(project / "params.yaml")


def test_absolute_paths_and_paths_that_stay_inside_are_accepted(project: Path, tmp_path: Path):
    elsewhere = tmp_path.parent / "elsewhere" / "train.jsonl"  # need not exist to be accepted
    params = load_params(
        project / "params.yaml",
        [f"data.sft_train={elsewhere}", "data.prompts_rl=data/../data/prompts/rl.jsonl"],
    )
    assert params.data.sft_train == str(elsewhere)


def test_a_symlink_inside_the_project_is_followed(project: Path, tmp_path_factory):
    """A symlink is a deliberate choice, like an absolute path (DVC may check data out as
    symlinks into its cache): the check is on the path as written."""
    outside = tmp_path_factory.mktemp("outside")
    os.symlink(outside, project / "linked")
    load_params(project / "params.yaml", ["data.sft_train=linked/train.jsonl"])


def test_no_command_writes_or_reads_out_of_the_project(project: Path, rlhf):
    code, _, err = rlhf("data", "demo", "-S", "data.dir=../demo-out")
    assert code == 2 and "data.dir: '../demo-out' is outside the project directory" in err
    assert not (project.parent / "demo-out").exists()
    code, _, err = rlhf("validate", "-S", "data.preferences_train=../x.jsonl")
    assert code == 2 and "data.preferences_train" in err
