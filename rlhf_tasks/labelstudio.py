"""Label Studio: the annotation server people compare the models' answers in.

Two halves:

- ``LabelStudio``, a client of Label Studio's REST API over httpx (projects, task import, the
  JSON export, users, annotations). Not ``label-studio-sdk``: its 2.x pulls OpenCV and NLTK into
  the project's lock for the six endpoints used here.
- ``serve`` / ``running``: a local Label Studio on 127.0.0.1 for the embedded default
  (``rlhf annotate serve``), from its own virtual environment (``make labelstudio``:
  ``.venv-labelstudio``, locked in ``labelstudio/requirements.lock``; its Django, pandas and
  sentry-sdk pins clash with the project's), with its data in ``.labelstudio/`` and an admin
  whose API key is written to ``.labelstudio/credentials.json`` (mode 600).

Which server: ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` from the environment (a team's
server), else the local one's credentials file. The key is sent only as a header: it is never
printed, logged, or recorded in MLflow. Both kinds of Label Studio key work: a personal access
token (a JWT, exchanged for an access token) and a legacy token.

A server that does not answer is a ``ResourceError`` (exit code 4) naming the URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_tasks.errors import ConfigError, ResourceError

URL_ENV, KEY_ENV = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"
LOCAL_DIR = Path(".labelstudio")  # the local server's database, media and credentials
CREDENTIALS = "credentials.json"
VENV = Path(".venv-labelstudio")
BIN_ENV = "LABEL_STUDIO_BIN"  # another label-studio executable than the project's own venv's
DEFAULT_PORT = 8080
ADMIN = "admin@localhost"
SQLITE = "label_studio.sqlite3"  # the database in a data directory (the embedded default)
BLANK_DB = Path("blank-db") / SQLITE  # in Label Studio's venv: `make labelstudio` migrates it


class LabelStudioError(ResourceError):
    """Label Studio did not answer, or answered with an error (exit code 4)."""


@dataclass(frozen=True)
class Server:
    """Where a Label Studio is and the key to it (the key never appears in a repr)."""

    url: str
    api_key: str

    def __repr__(self) -> str:
        return f"Server(url={self.url!r})"


def server(project_dir: Path = Path(".")) -> Server:
    """The Label Studio this project uses: the environment's, else the local one's."""
    url, key = os.environ.get(URL_ENV), os.environ.get(KEY_ENV)
    if url or key:
        if not (url and key):
            missing = KEY_ENV if url else URL_ENV
            raise ConfigError(f"{missing} is not set (both {URL_ENV} and {KEY_ENV} are needed)")
        return Server(url.rstrip("/"), key)
    path = project_dir / LOCAL_DIR / CREDENTIALS
    if not path.exists():
        raise ConfigError(
            f"no Label Studio: set {URL_ENV} and {KEY_ENV} (a team's server), or start the "
            "local one with `rlhf annotate serve`"
        )
    saved = json.loads(path.read_text())
    return Server(saved["url"], saved["api_key"])


class LabelStudio:
    """The REST calls the pipeline makes, with the errors a person can act on."""

    def __init__(self, where: Server, timeout_s: float = 60.0) -> None:
        import httpx

        self.url = where.url
        self._key = where.api_key
        self._http = httpx.Client(base_url=where.url, timeout=timeout_s)
        self._http.headers["Authorization"] = self._authorization()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _authorization(self) -> str:
        if self._key.count(".") != 2:
            return f"Token {self._key}"  # a legacy token
        # A personal access token is a JWT refresh token: exchange it for an access token.
        refreshed = self._send("POST", "/api/token/refresh/", json={"refresh": self._key})
        return f"Bearer {refreshed['access']}"

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LabelStudioError(
                f"Label Studio at {self.url} did not answer ({type(exc).__name__}: {exc}); "
                "nothing was changed"
            ) from None
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio at {self.url} refused the API key ({response.status_code}): "
                f"check {KEY_ENV} (a legacy token needs legacy tokens enabled for the "
                "organization)"
            )
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {method} {path} answered {response.status_code}: "
                f"{_detail(response)}"
            )
        return response.json() if response.content else None

    def whoami(self) -> dict[str, Any]:
        """The key's user: that the server answers and takes the key."""
        return self._send("GET", "/api/current-user/whoami")

    # -- projects and tasks ---------------------------------------------------------------------
    def projects(self) -> list[dict[str, Any]]:
        found = self._send("GET", "/api/projects/", params={"page_size": 10_000})
        return found["results"] if isinstance(found, dict) else found

    def project(self, ref: str | int) -> dict[str, Any]:
        """A project by id or title; ConfigError naming what exists when there is none."""
        projects = self.projects()
        for project in projects:
            if str(project["id"]) == str(ref) or project["title"] == str(ref):
                return project
        known = ", ".join(f"{p['id']} {p['title']!r}" for p in projects) or "none"
        raise ConfigError(f"Label Studio at {self.url} has no project {ref!r} (projects: {known})")

    def create_project(self, title: str, label_config: str, description: str = "") -> dict:
        body = {"title": title, "label_config": label_config, "description": description}
        return self._send("POST", "/api/projects/", json=body)

    def project_url(self, project_id: int) -> str:
        return f"{self.url}/projects/{project_id}/data"

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> int:
        """Add tasks (each ``{"data": {...}}``) to a project; the number added."""
        done = self._send("POST", f"/api/projects/{project_id}/import", json=tasks)
        return int(done["task_count"])

    def export(self, project_id: int, all_tasks: bool = False) -> list[dict[str, Any]]:
        """The project's tasks with their annotations (Label Studio's JSON export); only the
        annotated ones unless ``all_tasks``."""
        params = {"exportType": "JSON", "download_all_tasks": str(all_tasks).lower()}
        return self._send("GET", f"/api/projects/{project_id}/export", params=params)

    # -- people ---------------------------------------------------------------------------------
    def users(self) -> list[dict[str, Any]]:
        found = self._send("GET", "/api/users/", params={"page_size": 10_000})
        return found["results"] if isinstance(found, dict) else found

    def user(self, email: str) -> dict[str, Any]:
        """The user with this email, created if there is none (the admin's key can)."""
        for known in self.users():
            if known["email"] == email:
                return known
        name = email.partition("@")[0]
        return self._send("POST", "/api/users/", json={"email": email, "username": name})

    def annotate(self, task_id: int, result: list[dict[str, Any]], user_id: int) -> dict:
        """An annotation of a task, completed by that user."""
        body = {"result": result, "completed_by": user_id}
        return self._send("POST", f"/api/tasks/{task_id}/annotations/", json=body)


def _detail(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        return str(body.get("validation_errors") or body.get("detail") or body)[:300]
    return str(body)[:300]


# -- the local server ---------------------------------------------------------------------------
def executable() -> str:
    """The ``label-studio`` command: ``LABEL_STUDIO_BIN``, else that of ``make labelstudio``'s
    venv in this directory or in the checkout this package runs from."""
    if chosen := os.environ.get(BIN_ENV):
        if not Path(chosen).exists() and not shutil.which(chosen):
            raise ConfigError(f"{BIN_ENV}={chosen}: no such executable")
        return chosen
    places = [VENV, Path(__file__).resolve().parents[1] / VENV]
    for venv in places:
        if (venv / "bin" / "label-studio").exists():
            return str(venv / "bin" / "label-studio")
    raise ConfigError(
        f"no Label Studio to start in {' or '.join(map(str, places))}: `make labelstudio` "
        f"installs it (or set {BIN_ENV}, or use a running server through {URL_ENV} and "
        f"{KEY_ENV})"
    )


def _environment(data_dir: Path, database: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LATEST_VERSION_CHECK": "false",  # no call to PyPI at start-up
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }
    env.pop(URL_ENV, None)
    env.pop(KEY_ENV, None)
    if database:  # postgresql://user@host:port/name: a team's database instead of SQLite
        from urllib.parse import urlparse

        db = urlparse(database)
        if db.scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"{database}: Label Studio's database must be postgresql://...")
        env |= {
            "DJANGO_DB": "default",
            "POSTGRE_NAME": db.path.lstrip("/"),
            "POSTGRE_USER": db.username or "postgres",
            "POSTGRE_PASSWORD": db.password or "",
            "POSTGRE_HOST": db.hostname or "127.0.0.1",
            "POSTGRE_PORT": str(db.port or 5432),
        }
    return env


def start(
    data_dir: Path = LOCAL_DIR, port: int = DEFAULT_PORT, database: str | None = None
) -> tuple[subprocess.Popen, Server]:
    """Start Label Studio on 127.0.0.1:``port`` with its data in ``data_dir`` and a local admin
    (created the first time, with a random password and API key kept in the credentials file).
    Returns the process and the server once it answers."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    program = executable()
    blank = Path(program).resolve().parent.parent / BLANK_DB
    if database is None and blank.exists() and not (data_dir / SQLITE).exists():
        shutil.copyfile(blank, data_dir / SQLITE)  # migrated already: seconds, not ~40 s
    path = data_dir / CREDENTIALS
    url = f"http://127.0.0.1:{port}"
    if path.exists():
        saved = json.loads(path.read_text())
    else:
        saved = {"email": ADMIN, "password": secrets.token_urlsafe(12)}
        saved["api_key"] = secrets.token_hex(20)
    saved["url"] = url
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its mode otherwise
    with os.fdopen(fd, "w") as out:
        json.dump(saved, out, indent=2)
    command = [
        program,
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--host",
        url,
        "--data-dir",
        str(data_dir),
        # KEY=VALUE: a random password may start with "-", which argparse would take for an
        # option ("--password: expected one argument").
        f"--username={saved['email']}",
        f"--password={saved['password']}",
        f"--user-token={saved['api_key']}",
        "--enable-legacy-api-token",
    ]
    log = (data_dir / "server.log").open("ab")
    process = subprocess.Popen(
        command,
        env=_environment(data_dir, database),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    where = Server(url, saved["api_key"])
    try:
        _wait(process, url, data_dir / "server.log")
    except BaseException:
        stop(process)
        raise
    return process, where


def _wait(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 300.0) -> None:
    """Until ``url/health`` answers (the first start migrates the database: about 40 s)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise LabelStudioError(
                f"Label Studio exited with code {process.returncode} while starting; the end "
                f"of {log}:\n" + "\n".join(tail)
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise LabelStudioError(f"Label Studio did not answer at {url} within {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Stop the server and its children (it runs in its own process group)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running(
    data_dir: Path = LOCAL_DIR, port: int = DEFAULT_PORT, database: str | None = None
) -> Iterator[Server]:
    """A local Label Studio for the length of the block."""
    process, where = start(data_dir, port, database)
    try:
        yield where
    finally:
        stop(process)
