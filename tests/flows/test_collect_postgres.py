"""Label Studio for a team: on PostgreSQL (a database of the test's own, dropped at the end),
started by `rlhf annotate serve`'s code on 127.0.0.1; a project made, tasks imported, labelled
through the HTTP API and pulled as pairs, with the tasks and annotations in that database.
(Its own module: the first start migrates the database, about a minute, on the worker that is
not running the demo.)"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from helpers import ANSWERS, PG, pg_databases

from rlhf_tasks import collect, labelstudio
from rlhf_tasks.config import load_params

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _count(database: str, table: str) -> int:
    import psycopg2

    conn = psycopg2.connect(dbname=database, **PG)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_label_studio_on_postgresql(project: Path, tmp_path: Path) -> None:
    with pg_databases("labelstudio") as dbs:
        name = dbs["labelstudio"]
        url = f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
        with (
            labelstudio.running(tmp_path / "ls", _free_port(), database=url) as where,
            labelstudio.LabelStudio(where) as client,
        ):
            params = load_params("params.yaml", ["collect.project=On PostgreSQL"])
            found = collect.project(client, params, create=True)
            assert client.import_tasks(found["id"], collect.tasks(params, ANSWERS)) == 2
            first, second = sorted(t["id"] for t in client.export(found["id"], all_tasks=True))
            person = client.user("ann-a@x.org")["id"]
            for task, side in ((first, "right"), (second, "left")):
                result = [
                    {"from_name": "preference", "to_name": "prompt", "type": "choices",
                     "value": {"choices": [side]}}
                ]  # fmt: skip
                client.annotate(task, result, person)
            pulled = collect.pull(params, client, tmp_path / "collect")
            # Label Studio kept them in the team's database, not in a SQLite file.
            assert _count(name, "task") == 2 and _count(name, "task_completion") == 2
            assert not list((tmp_path / "ls").rglob("*.sqlite3"))
    rows = [json.loads(line) for line in Path(pulled["batch"]).read_text().splitlines()]
    tasks = {t: data for t, data in zip((first, second), ANSWERS.items(), strict=True)}
    assert len(rows) == 2 and pulled["completed"] == 2
    for row in rows:
        task = json.loads(row["source"])["task"]
        assert row["prompt"] == tasks[task][0] and row["annotator"] == "ann-a@x.org"
