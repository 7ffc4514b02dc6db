"""Registration, the champion/challenger gate, and the registry commands, on a real MLflow store:
the embedded sqlite default, and a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import GOOD_EVALUATION as GOOD
from helpers import POLICY, REWARD
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_tasks import dataversion, promote
from rlhf_tasks.config import load_params
from rlhf_tasks.runner import run_stage
from rlhf_tasks.tracking import store

pytestmark = pytest.mark.slow  # models registered in a real MLflow store, and a real server


def _git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=project, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def trained(project: Path, validated, base_model_dir: Path) -> Path:
    """A project as the stages before promote leave it: a policy and a reward model (the tiny
    base model), evaluate's metrics, a passed gate, and a git commit. Not a DVC repository: runs
    are tagged with DVC's hash of the data files read (``data_md5``)."""
    validated()
    shutil.copytree(base_model_dir, project / "artifacts/policy/model")
    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1)
    scorer.save_pretrained(reward_dir := project / "artifacts/reward/model")
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(reward_dir)
    (project / "artifacts/policy/run.json").write_text('{"policy/algorithm": "ppo"}')
    (project / "artifacts/validate/report.json").write_text('{"valid": true}')
    evaluation(project, GOOD)
    (project / ".gitignore").write_text("artifacts/\ndata/\nmlflow.db\nmlruns/\n")
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x")
    return project


def evaluation(project: Path, metrics: dict[str, float]) -> None:
    path = project / "artifacts/evaluate/metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))


def data_md5() -> str:
    """The data version a run in the project records: DVC's hash of the files it reads."""
    return dataversion.data_version(load_params("params.yaml")).md5


def promote_stage(*overrides: str) -> dict:
    run_stage("promote", load_params("params.yaml", list(overrides)))
    return json.loads(Path("artifacts/promote/decision.json").read_text())


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=store.tracking_uri())


def test_first_model_is_judged_against_sft_and_becomes_champion(trained: Path) -> None:
    # Without a champion, the gate reads the judge's win rate against SFT from the evaluation
    # (not the gold judge's): below promote.min_win_rate, the model is rejected against SFT.
    evaluation(trained, {**GOOD, "judge/win_rate_vs_sft": 0.54, "gold/win_rate_vs_sft": 0.9})
    decision = promote_stage()
    assert not decision["promoted"] and decision["baseline"] == "sft"
    assert decision["reasons"] == [
        "judge's win rate vs sft is 0.540, below promote.min_win_rate 0.55"
    ]
    c = client()
    assert "champion" not in c.get_registered_model(POLICY).aliases
    # At the bar's side that passes, the next version becomes the champion.
    evaluation(trained, GOOD)
    decision = promote_stage()
    assert decision["promoted"] and decision["baseline"] == "sft"
    assert decision["version"] == 2 and decision["reasons"] == []
    mv = c.get_model_version_by_alias(POLICY, "champion")
    assert str(mv.version) == "2"
    assert str(c.get_model_version_by_alias(POLICY, "challenger").version) == "2"
    assert str(c.get_model_version_by_alias(REWARD, "champion").version) == "2"
    assert c.get_model_version(POLICY, "1").tags["rlhf.promotion"] == "rejected"
    tags = mv.tags
    assert tags["rlhf.data_md5"] == data_md5() and tags["rlhf.data_dvc_tracked"] == "false"
    assert tags["rlhf.git_commit"] == _git(trained, "rev-parse", "HEAD")
    assert tags["rlhf.validation"] == "passed"
    assert tags["rlhf.promotion"] == "champion"
    assert tags["judge/win_rate_vs_sft"] == "0.6600" and tags["policy/kl_to_sft"] == "2.0000"
    assert c.get_run(tags["rlhf.run.promote"]).data.tags["rlhf.stage"] == "promote"
    assert json.loads(Path("artifacts/mlflow_runs/promote.json").read_text())["run_id"]


def test_a_worse_challenger_is_rejected_with_its_reasons(trained: Path, rlhf) -> None:
    promote_stage()
    # The same policy again, now with a reward model below the floor and a blown KL budget:
    # against the champion (itself) it only ties, and two guard rails fail.
    evaluation(
        trained,
        {
            **GOOD,
            "reward_model/accuracy": 0.6,
            "checks/kl_within_budget": 0.0,
            "policy/kl_to_sft": 25.0,
        },
    )
    decision = promote_stage()
    assert not decision["promoted"] and decision["version"] == 2
    assert decision["baseline"].endswith("version 1 (champion)")
    assert decision["win_rate"] == pytest.approx(0.5)  # identical models: every sample ties
    reasons = " | ".join(decision["reasons"])
    assert "below promote.min_win_rate 0.55" in reasons
    assert "accuracy 0.600 is below promote.min_reward_model_accuracy" in reasons
    assert "kl_within_budget failed: KL to SFT 25.00 nats > evaluate.kl_budget" in reasons
    c = client()
    assert str(c.get_model_version_by_alias(POLICY, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(POLICY, "challenger").version) == "2"
    assert c.get_model_version(POLICY, "2").tags["rlhf.promotion"] == "rejected"
    code, out, _ = rlhf("models")
    assert code == 0
    assert "rejected" in out and "why: judge's win rate" in out, out


def test_promote_by_hand_and_rollback(trained: Path, rlhf) -> None:
    code, _, err = rlhf("rollback")
    assert code == 1 and "nothing to roll back: rlhf-demo-policy has no champion" in err
    promote_stage()
    code, _, err = rlhf("rollback")
    assert code == 1
    assert "nothing to roll back to: version 1 is the only champion" in err
    evaluation(trained, {**GOOD, "reward_model/accuracy": 0.5})
    assert not promote_stage()["promoted"]
    code, out, _ = rlhf("promote", "--version", "2")
    assert code == 0 and "champion is now version 2 (was version 1); promoted by hand" in out
    c = client()
    assert str(c.get_model_version_by_alias(POLICY, "champion").version) == "2"
    assert str(c.get_model_version_by_alias(REWARD, "champion").version) == "2"
    assert c.get_model_version(POLICY, "2").tags["rlhf.promotion"] == "champion (manual)"
    code, out, _ = rlhf("rollback")
    assert code == 0 and "champion is now version 1 (rolled back from 2)" in out
    assert str(c.get_model_version_by_alias(POLICY, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(REWARD, "champion").version) == "1"
    assert c.get_model_version(POLICY, "2").tags["rlhf.promotion"] == "rolled back"
    code, _, err = rlhf("rollback")
    assert code == 1 and "nothing to roll back to" in err
    code, _, err = rlhf("promote", "--version", "7")
    assert code == 2 and "rlhf-demo-policy has no version 7" in err


def test_a_failure_after_registering_leaves_the_registry_as_it_was(
    trained: Path, monkeypatch
) -> None:
    promote_stage()

    def broken_gate(*args, **kwargs):
        raise RuntimeError("judge crashed")

    monkeypatch.setattr(promote, "gate", broken_gate)
    with pytest.raises(RuntimeError, match="judge crashed"):
        promote_stage()
    c = client()
    assert [str(mv.version) for mv in c.search_model_versions(f"name = '{POLICY}'")] == ["1"]
    assert [str(mv.version) for mv in c.search_model_versions(f"name = '{REWARD}'")] == ["1"]
    assert str(c.get_model_version_by_alias(POLICY, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(POLICY, "challenger").version) == "1"
    runs = c.search_runs(
        [c.get_experiment_by_name("rlhf").experiment_id], "tags.`rlhf.stage` = 'promote'"
    )
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


def test_lineage_and_generate_from_the_champion(trained: Path, rlhf) -> None:
    promote_stage()
    code, out, _ = rlhf("lineage", f"{POLICY}@champion")
    assert code == 0, out
    assert f"data md5:       {data_md5()}" in out
    assert _git(trained, "rev-parse", "HEAD") in out
    assert "promote.min_win_rate = 0.55" in out  # params of the run that logged it
    code, _, err = rlhf("lineage", f"{POLICY}@nope")
    assert code == 2 and "has no version with alias 'nope'" in err
    code, out, _ = rlhf("generate", "Tell me about dogs.")
    assert code == 0 and out.strip()


CONSUMER = """
import json, sys
import mlflow

chat = {"messages": [{"role": "user", "content": sys.argv[1]}]}


def _raised(call):
    try:
        call()
    except mlflow.exceptions.MlflowException as exc:
        return exc
    raise AssertionError("not refused")


policy = mlflow.pyfunc.load_model(sys.argv[2])
reward = mlflow.pyfunc.load_model(sys.argv[3])
print(json.dumps({
    "answer": policy.predict(chat),
    "short": policy.predict(chat, params={"max_tokens": 3, "temperature": 0.1}),
    "scores": reward.predict({"prompt": [sys.argv[1]] * 2, "response": sys.argv[4:6]}),
    "signature": policy.metadata.signature.to_dict(),
    "greedy": policy.predict(chat, params={"temperature": 0.0, "max_tokens": 2}),
    "refused": [
        str(exc.message)
        for call in (
            lambda: policy.predict(chat, params={"top_p": 2.0}),
            lambda: reward.predict({"prompt": ["Tell me about dogs."]}),
        )
        for exc in [_raised(call)]
    ],
}))
"""


def _serve(uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow models serve`` of ``uri`` on 127.0.0.1 in this environment; (process, url)."""
    port = _free_port()
    venv = str(Path(sys.executable).parent)  # it runs `uvicorn` from PATH: an activated venv's
    proc = subprocess.Popen(
        [
            str(Path(venv) / "mlflow"),
            *("models", "serve", "-m", uri, "--env-manager", "local"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        env={
            **os.environ,
            "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": store.tracking_uri(),
        },
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _post(url: str, body: dict, log: Path, proc: subprocess.Popen) -> object:
    import urllib.request

    deadline = time.monotonic() + 180
    while True:  # until the server answers
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_the_champion_serves_as_it_was_evaluated(
    trained: Path, rlhf, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A consumer of the registry gets the model that was evaluated: the champion, loaded with
    MLflow's pyfunc API in a fresh process and served by `mlflow models serve`, answers a chat
    request with what `rlhf generate` and the evaluation say (the same code path, seed and
    settings); the registered reward model scores as ``reward.score`` does."""
    from rlhf_tasks import evaluate, reward

    samples = [
        {"prompt": "Tell me about cats.", "sft": "Cats.", "policy": "Cats purr when content."},
        {"prompt": "Tell me about cats.", "sft": "Cats!", "policy": "Cats nap."},  # 2nd sample
        {"prompt": "Tell me about owls.", "sft": "Owls.", "policy": "Owls hunt at night."},
    ]
    generations = trained / "artifacts/evaluate/generations.jsonl"
    generations.write_text("".join(json.dumps(row) + "\n" for row in samples))
    promote_stage()
    capsys.readouterr()  # what promote printed
    # The registry reads on its own: why the version is champion, and how to call the model.
    c = client()
    version = c.get_model_version(POLICY, "1")
    assert version.description.startswith("**Champion**: win rate"), version.description
    for fact in (data_md5(), _git(trained, "rev-parse", "HEAD"), "Owls hunt at night."):
        assert fact in version.description, (fact, version.description)
    assert "Cats nap." not in version.description  # one answer per prompt
    assert "mlflow models serve" in c.get_registered_model(POLICY).description
    assert f"{POLICY} version 1" in c.get_model_version(REWARD, "1").description
    prompt, responses = "Tell me about dogs.", ["Dogs love to run.", "No."]
    code, said, _ = rlhf("generate", prompt)
    assert code == 0
    said = said.strip()
    params = load_params("params.yaml")
    policy_dir, reward_dir = trained / "artifacts/policy/model", trained / "artifacts/reward/model"
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(policy_dir),
        AutoTokenizer.from_pretrained(policy_dir),
    )
    assert evaluate.generate(model.eval(), tokenizer, [prompt], params.evaluate) == [said]
    scorer, rm_tokenizer = reward.load_reward_model(reward_dir)
    scores = reward.score(scorer, rm_tokenizer, [prompt] * 2, responses)

    champion, scoring = f"models:/{POLICY}@champion", f"models:/{REWARD}/1"
    consumer = tmp_path / "consumer"  # not the project: only the registry's address
    consumer.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.tracking_uri()}
    proc = subprocess.run(
        [sys.executable, "-c", CONSUMER, prompt, champion, scoring, *responses],
        cwd=consumer,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["answer"]["object"] == "chat.completion"
    assert got["answer"]["choices"][0]["message"] == {"role": "assistant", "content": said}
    short = got["short"]["choices"][0]["message"]["content"]  # settings per request
    request = params.evaluate.model_copy(update={"max_new_tokens": 3, "temperature": 0.1})
    assert [short] == evaluate.generate(model, tokenizer, [prompt], request) != [said]
    assert got["scores"] == pytest.approx(scores, abs=1e-5)
    # Temperature 0 is greedy; a reply cut at max_tokens says so; bad requests are refused.
    greedy = params.evaluate.model_copy(update={"max_new_tokens": 2, "temperature": 0.0})
    assert got["greedy"]["choices"][0] == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": evaluate.generate(model, tokenizer, [prompt], greedy)[0],
        },
        "finish_reason": "length",
    }
    assert got["refused"][0] == "top_p must be in (0, 1], not 2.0"
    assert got["refused"][1].startswith("request 0: give `prompt` and `response` (strings)")
    # The evaluation's settings are the defaults a request may override.
    defaults = {p["name"]: p["default"] for p in json.loads(got["signature"]["params"])}
    assert defaults == {
        "max_tokens": params.evaluate.max_new_tokens,
        "temperature": params.evaluate.temperature,
        "top_p": params.evaluate.top_p,
        "seed": params.evaluate.seed,
    }

    logs = [tmp_path / "serve-policy.log", tmp_path / "serve-reward.log"]
    servers = [_serve(uri, log) for uri, log in zip((champion, scoring), logs, strict=True)]
    try:
        (chat_proc, chat_url), (score_proc, score_url) = servers
        answer = _post(
            chat_url,
            {"messages": [{"role": "user", "content": prompt}]},
            logs[0],
            chat_proc,
        )
        assert answer["choices"][0]["message"]["content"] == said, answer
        served = _post(
            score_url,
            {"dataframe_records": [{"prompt": prompt, "response": r} for r in responses]},
            logs[1],
            score_proc,
        )
        assert served["predictions"] == pytest.approx(scores, abs=1e-5), served
    finally:
        for proc_, _ in servers:
            proc_.terminate()
        for proc_, _ in servers:
            try:
                proc_.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc_.kill()


def test_a_version_registered_before_pyfunc_models_still_loads(trained: Path) -> None:
    """Versions that earlier releases logged with MLflow's transformers flavor stay usable by
    `rlhf generate` and promote's comparison with the champion."""
    import mlflow

    from rlhf_tasks.tracking import logged_models

    policy_dir = trained / "artifacts/policy/model"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store.tracking_uri())
    try:
        mlflow.set_experiment("earlier-release")
        with mlflow.start_run():
            info = mlflow.transformers.log_model(
                {
                    "model": AutoModelForCausalLM.from_pretrained(policy_dir),
                    "tokenizer": AutoTokenizer.from_pretrained(policy_dir),
                },
                name="policy",
                task="text-generation",
                pip_requirements=["transformers"],  # no inference of them (no torchvision here)
            )
        components = logged_models.load_logged_model(f"models:/{info.model_id}")
    finally:
        mlflow.set_tracking_uri(previous)
    assert components["model"].config.architectures == ["LlamaForCausalLM"]
    assert components["tokenizer"].chat_template


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch):
    """A real ``mlflow server`` on 127.0.0.1: sqlite backend, local artifact root."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (root / "server.log").read_text()
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_register_and_promote_against_an_mlflow_server(trained: Path, mlflow_server: Path, rlhf):
    assert store.tracking_uri().startswith("http://127.0.0.1:")
    decision = promote_stage()
    assert decision["promoted"]
    evaluation(trained, {**GOOD, "judge/win_rate_vs_sft": 0.9})
    assert not promote_stage()["promoted"]  # ties with the champion
    c = client()
    assert str(c.get_model_version_by_alias(POLICY, "champion").version) == "1"
    assert c.get_model_version(POLICY, "2").tags["rlhf.promotion"] == "rejected"
    # Nothing went to the embedded store; the server's artifact root holds the models.
    embedded = MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlflow.db'}")
    assert [e.name for e in embedded.search_experiments()] == ["Default"]
    assert any((mlflow_server / "artifacts").rglob("model.safetensors"))
    code, out, _ = rlhf("lineage", f"{POLICY}/1")
    assert code == 0 and data_md5() in out
