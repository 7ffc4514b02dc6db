"""Collecting preferences through a real Label Studio server (127.0.0.1, SQLite, started and
stopped by this module): `rlhf collect` asks about the demo champion's answers, people label
through Label Studio's HTTP API, `rlhf collect pull` ingests exactly their pairs once; bad
annotations and a server that is down ingest nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import ANSWERS, BIN, FEW_STEPS, POLICY, env
from mlflow import MlflowClient

from rlhf_tasks import collect, labelstudio
from rlhf_tasks.config import Params, load_params
from rlhf_tasks.errors import ConfigError, DataError

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test server's data: its SQLite database and the admin's credentials."""
    return tmp_path_factory.mktemp("labelstudio")


@pytest.fixture(scope="module")
def server(server_dir: Path) -> Iterator[labelstudio.Server]:
    with labelstudio.running(server_dir, _free_port()) as where:
        yield where


@pytest.fixture(scope="module")
def client(server: labelstudio.Server) -> Iterator[labelstudio.LabelStudio]:
    with labelstudio.LabelStudio(server) as ls:
        yield ls


@pytest.fixture
def use(server: labelstudio.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands talk to the test's server, as a team's environment would make them."""
    monkeypatch.setenv(labelstudio.URL_ENV, server.url)
    monkeypatch.setenv(labelstudio.KEY_ENV, server.api_key)


def _choose(client: labelstudio.LabelStudio, task: int, who: str, choice: str, strength=None):
    result = [
        {"from_name": "preference", "to_name": "prompt", "type": "choices",
         "value": {"choices": [choice]}}
    ]  # fmt: skip
    if strength:
        result.append(
            {"from_name": "strength", "to_name": "prompt", "type": "choices",
             "value": {"choices": [strength]}}
        )  # fmt: skip
    return client.annotate(task, result, client.user(who)["id"])


def _snapshot(root: Path) -> dict[str, bytes]:
    files = [*sorted((root / "data").rglob("*")), root / "data.dvc"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


@pytest.fixture(scope="module")
def champion_project(demo_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo run's project: data, a champion in the registry, git and DVC."""
    dest = tmp_path_factory.mktemp("collect") / "project"
    shutil.copytree(demo_run.clone, dest, symlinks=True)
    return dest


def test_collect_label_pull_ingest_once(
    champion_project: Path, client, use, rlhf, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(champion_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    title = "Demo preferences"
    settings = ["-S", f"collect.project={title}", "-S", "collect.num_prompts=6"]
    code, out, err = rlhf("collect", *settings)
    assert code == 0, out + err
    project = client.project(title)
    assert f"{client.url}/projects/{project['id']}/data" in out + err
    tasks = client.export(project["id"], all_tasks=True)
    assert 1 <= len(tasks) <= 6
    lines = Path("data/prompts/rl.jsonl").read_text().splitlines()
    pool = {json.loads(line)["prompt"] for line in lines}
    for task in tasks:
        data = task["data"]
        assert data["prompt"] in pool and data["left"] != data["right"]
        assert data["left_model"] == data["right_model"] == "rlhf-demo-policy/1"
        assert data["digest"] == collect.digest(data["prompt"], data["left"], data["right"])
        assert data["sampling"]["temperature"] == 0.7

    # People label through the HTTP API: one task by three people (majority "right"), one tie,
    # the rest "left" with a strength.
    first, *rest = [t["id"] for t in tasks]
    for who, choice in (("ann-a@x.org", "right"), ("ann-b@x.org", "right"), ("c@x.org", "left")):
        _choose(client, first, who, choice, "strong")
    if rest:
        _choose(client, rest[0], "ann-a@x.org", "tie")
    for task in rest[1:]:
        _choose(client, task, "ann-a@x.org", "left", "slight")
    train = Path("data/preferences/train.jsonl")
    before = train.read_text().splitlines()
    commits = len(_git_log())

    code, out, err = rlhf("collect", "pull", "--no-push", *settings)
    assert code == 0, out + err
    after = train.read_text().splitlines()
    assert after[: len(before)] == before  # appended, nothing rewritten
    added = {row["id"]: row for row in map(json.loads, after[len(before) :])}
    by_task = {t["id"]: t["data"] for t in tasks}
    expected = {first: "right", **{t: "left" for t in rest[1:]}}
    assert set(added) == {f"labelstudio-{project['id']}-{t}" for t in expected}
    for task, side in expected.items():
        row, data = added[f"labelstudio-{project['id']}-{task}"], by_task[task]
        other = "left" if side == "right" else "right"
        assert (row["prompt"], row["chosen"], row["rejected"]) == (
            data["prompt"], data[side], data[other]
        )  # fmt: skip
        source = json.loads(row["source"])
        assert source["task"] == task and source["project"] == project["id"]
        assert source["chosen_model"] == data[f"{side}_model"]
    first_row = added[f"labelstudio-{project['id']}-{first}"]
    assert first_row["annotator"] == "ann-a@x.org+ann-b@x.org" and first_row["margin"] == 2.0
    assert all(added[f"labelstudio-{project['id']}-{t}"]["margin"] == 0.0 for t in rest[1:])
    assert "1 tie" in out + err
    assert len(_git_log()) == commits + 1  # data.dvc committed: the new data version

    # Pulled again, every pair is in the data already: nothing new to ingest.
    again = collect.pull(load_params("params.yaml", [f"collect.project={title}"]), client)
    assert again["batch"] is None and again["new_pairs"] == 0
    assert again["already_ingested"] == len(expected)


def test_one_round_of_rlhf_on_the_demo(demo_run, tmp_path: Path, client, use, rlhf, monkeypatch):
    """`rlhf rounds 1`: the champion's answers in Label Studio, labelled by the demo's simulated
    annotators (three each), pulled and committed as a new data version, then the pipeline
    retrains on it and promote decides; the round's row holds that retrain's figures. The
    retrain takes a few steps from the base model (the wiring is under test), so its policy is
    far worse than the demo's champion whatever the sample: the gate rejects it, and the
    champion stays (the registry's "a worse run does not take the champion")."""
    project = tmp_path / "project"
    shutil.copytree(demo_run.clone, project, symlinks=True)
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = Path("data/preferences/train.jsonl").read_text().splitlines()
    # uncertain: the tasks' pairs chosen by the champion's reward model (loaded from the registry)
    settings = ["collect.project=Rounds", "collect.num_prompts=6", "collect.selection=uncertain"]
    settings += FEW_STEPS
    code, out, err = rlhf("rounds", "1", *(f"-S{s}" for s in settings))
    assert code == 0, out + err
    start, first = json.loads(Path("artifacts/rounds/rounds.json").read_text())
    after = Path("data/preferences/train.jsonl").read_text().splitlines()
    added = [json.loads(line) for line in after[len(before) :]]
    assert first["pairs_added"] == len(added) > 0 and after[: len(before)] == before
    assert all(row["id"].startswith("labelstudio-") for row in added)
    assert first["annotations"] == 3 * first["tasks"] and first["tasks"] >= len(added)
    assert first["train_pairs"] == len(after)  # the retrain read the new data version
    evaluation = json.loads(Path("artifacts/evaluate/metrics.json").read_text())
    assert first["repeats"] == evaluation["gold/policy_repeats_a_fact"]
    assert first["gold_score"] == evaluation["gold/policy_score"]
    decision = json.loads(Path("artifacts/promote/decision.json").read_text())
    assert decision["baseline"].endswith("(champion)")
    assert first["win_vs_champion"] == decision["win_rate"]
    assert start["round"] == 0 and start["gold_score"] != first["gold_score"]
    assert start["rm_prefers_repeat"] is not None  # the demo's reward model, probed
    assert "| round | tasks |" in Path("artifacts/rounds/rounds.md").read_text()

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert first["promoted"] == "no" and not decision["promoted"]
    assert str(client.get_model_version_by_alias(POLICY, "champion").version) == "1"
    worse = client.get_model_version(POLICY, "2")
    assert worse.tags["rlhf.promotion"] == "rejected"
    assert "below promote.min_win_rate" in worse.tags["rlhf.rejected_reasons"]
    assert str(client.get_model_version_by_alias(POLICY, "challenger").version) == "2"
    code, out, err = rlhf("models")
    assert code == 0 and "rejected" in out and "champion" in out, out + err


def _git_log() -> list[str]:
    import subprocess

    return subprocess.run(
        ["git", "log", "--format=%H"], capture_output=True, text=True, check=True
    ).stdout.split()


def test_a_personal_access_token_or_a_wrong_key(server: labelstudio.Server, client) -> None:
    """A team's key is usually a personal access token (a JWT refresh token, exchanged for an
    access token); a key the server refuses is a clear error naming the server."""
    token = client._send("POST", "/api/token/")["token"]
    with labelstudio.LabelStudio(labelstudio.Server(server.url, token)) as team:
        assert team.whoami()["email"] == labelstudio.ADMIN
        assert team._http.headers["Authorization"].startswith("Bearer ")
    with (
        labelstudio.LabelStudio(labelstudio.Server(server.url, "not-the-key")) as wrong,
        pytest.raises(labelstudio.LabelStudioError, match=f"at {server.url} refused the API key"),
    ):
        wrong.whoami()


# -- bad annotations: each fails the pull, naming the task; nothing is ingested ------------------
# The checks are collect.pull's (called directly); one of them, and a pull with nothing new, also
# through `rlhf collect pull`, which must then leave data/ byte for byte as it was.


@dataclass(frozen=True)
class Labelled:
    title: str
    project_id: int
    tasks: list[int]
    params: Params


@pytest.fixture
def labelled(project: Path, client, use, request) -> Labelled:
    """Two tasks (answers given, no model) in a Label Studio project of the test's own."""
    title = f"test {request.node.name}"[:50]
    params = load_params("params.yaml", [f"collect.project={title}"])
    found = collect.project(client, params, create=True)
    client.import_tasks(found["id"], collect.tasks(params, ANSWERS))
    ids = sorted(t["id"] for t in client.export(found["id"], all_tasks=True))
    return Labelled(title, found["id"], ids, params)


def test_an_annotation_without_a_choice(labelled: Labelled, client) -> None:
    first = labelled.tasks[0]
    client.annotate(first, [], client.user("ann-a@x.org")["id"])
    with pytest.raises(DataError, match=f"^task {first}: annotation .* has no choice"):
        collect.pull(labelled.params, client)


def test_one_person_labelling_a_task_two_ways(labelled: Labelled, client) -> None:
    first = labelled.tasks[0]
    _choose(client, first, "ann-a@x.org", "left")
    _choose(client, first, "ann-a@x.org", "right")
    with pytest.raises(DataError, match=f"^task {first}: ann-a@x.org labelled it two ways"):
        collect.pull(labelled.params, client)


def test_an_unknown_project(labelled: Labelled, client) -> None:
    params = load_params("params.yaml", ["collect.project=no such project"])
    with pytest.raises(ConfigError, match=f"has no project 'no such project'.*{labelled.title}"):
        collect.pull(params, client)


def test_a_task_edited_after_import(labelled: Labelled, client, rlhf) -> None:
    first = labelled.tasks[0]
    task = next(t for t in client.export(labelled.project_id, True) if t["id"] == first)
    edited = {**task["data"], "left": task["data"]["left"] + " Edited."}
    client._send("PATCH", f"/api/tasks/{first}/", json={"data": edited})
    _choose(client, first, "ann-a@x.org", "left")
    _choose(client, labelled.tasks[1], "ann-a@x.org", "right")  # a good one: not ingested either
    before = _snapshot(Path("."))
    code, out, err = rlhf("collect", "pull", "--no-push", "-S", f"collect.project={labelled.title}")
    assert code == 1, out + err
    assert f"task {first}: its prompt or answers were edited in Label Studio" in err, err
    assert "Traceback" not in out + err
    assert _snapshot(Path(".")) == before


def test_a_pull_with_no_completed_task(labelled: Labelled, rlhf) -> None:
    code, out, err = rlhf("collect", "pull", "-S", f"collect.project={labelled.title}")
    assert code == 1, out + err
    assert "0 completed task(s)" in out + err and "nothing new to ingest" in out + err


def test_label_studio_down(project: Path, rlhf, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv(labelstudio.URL_ENV, url)
    monkeypatch.setenv(labelstudio.KEY_ENV, "some-token")
    before = _snapshot(Path("."))
    code, out, err = rlhf("collect", "pull")
    assert code == 4, out + err
    assert f"Label Studio at {url} did not answer" in err and "Traceback" not in err
    assert _snapshot(Path(".")) == before


def test_the_demo_annotators_label_as_users_of_their_own(labelled: Labelled, client, rlhf) -> None:
    code, out, err = rlhf(
        "annotate", "simulate", "--per-task", "3", "-S", f"collect.project={labelled.title}"
    )
    assert code == 0 and "6 annotation(s) of 2 open task(s)" in out, out + err
    for task in client.export(labelled.project_id):
        people = [a["completed_by"] for a in task["annotations"]]
        assert len(set(people)) == 3
    emails = {u["id"]: u["email"] for u in client.users()}
    assert {emails[p] for p in people} <= {f"ann-{i}@demo.local" for i in range(1, 6)}


def test_the_demo_annotators_refuse_a_prompt_off_the_demo(labelled: Labelled, client) -> None:
    off = {"Summarise the French revolution.": [("It began in 1789.", "m/1"), ("No.", "m/1")]}
    client.import_tasks(labelled.project_id, collect.tasks(labelled.params, off))
    with pytest.raises(ConfigError, match="judge the demo's topics only"):
        collect.simulate(labelled.params, client)
    assert not client.export(labelled.project_id)  # no task was labelled


def test_annotate_serve_runs_a_local_server_until_ctrl_c(project: Path) -> None:
    """`rlhf annotate serve`: Label Studio on 127.0.0.1 with a local admin whose key is in a
    file only its owner reads, and gone after Ctrl-C."""
    port = _free_port()
    command = [BIN / "rlhf", "annotate", "serve", "--port", str(port)]
    credentials = project / ".labelstudio" / "credentials.json"
    # Kept from an earlier start: a password that starts with "-" (as a random one may) is
    # passed to Label Studio's argparse as a value, not taken for an option.
    credentials.parent.mkdir()
    earlier = {"email": labelstudio.ADMIN, "password": "-a-b-c-1234", "api_key": "f00d" * 10}
    credentials.write_text(json.dumps(earlier))
    proc = subprocess.Popen(
        command, cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        saved = json.loads(credentials.read_text())
        assert saved == {**earlier, "url": f"http://127.0.0.1:{port}"}
        assert credentials.stat().st_mode & 0o777 == 0o600
        with labelstudio.LabelStudio(labelstudio.Server(saved["url"], saved["api_key"])) as ls:
            assert ls.whoami()["email"] == labelstudio.ADMIN
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            log = project / ".labelstudio" / "server.log"
            pytest.fail(f"still up 60 s after Ctrl-C:\n{out}\n--- {log}\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, out
    assert f"Label Studio at http://127.0.0.1:{port}" in out and "stopping Label Studio" in out
    assert saved["api_key"] not in out and saved["password"] not in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


CHROMIUM = os.environ.get("RLHF_CHROMIUM", "/usr/bin/chromium")  # `make browser` installs it
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_a_person_labels_in_a_real_browser(
    labelled: Labelled, server, server_dir: Path, client
) -> None:
    """Headless Chromium logs into Label Studio as its admin, opens a task, picks answer B with
    a clear strength and submits; the pull then holds exactly that pair, B chosen. The
    labelling page is kept as test-artifacts/labelstudio-labelling.png."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM}: no Chromium (`make browser` installs it)"
    credentials = json.loads((server_dir / labelstudio.CREDENTIALS).read_text())
    task = next(t for t in client.export(labelled.project_id, True) if t["id"] == labelled.tasks[0])
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server.url}/user/login")
            page.fill("input[name=email]", credentials["email"])
            page.fill("input[name=password]", credentials["password"])
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{server.url}/projects/{labelled.project_id}/data?task={task['id']}")
            page.get_by_text("B is better").wait_for(timeout=60_000)
            page.get_by_text(task["data"]["right"]).first.wait_for()  # the answers, as imported
            page.screenshot(path=SCREENSHOTS / "labelstudio-labelling.png")
            page.get_by_text("B is better").click()
            page.locator("label", has_text="clear").first.click()
            page.get_by_role("button", name="Submit").click()
            deadline = time.monotonic() + 30
            while not client.export(labelled.project_id) and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            browser.close()
    pulled = collect.pull(labelled.params, client)
    (pair,) = [json.loads(line) for line in Path(pulled["batch"]).read_text().splitlines()]
    data = task["data"]
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (
        data["prompt"], data["right"], data["left"]
    )  # fmt: skip
    assert pair["annotator"] == labelstudio.ADMIN and pair["margin"] == 1.0


# Headless, as root, on a machine with no network but loopback: no sandbox, no GPU, and none of
# Chromium's own background connections.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
