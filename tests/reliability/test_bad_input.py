"""Bad input never reaches training, whichever way it comes in.

Data comes in by three doors: ``rlhf validate`` (the gate alone), ``rlhf run`` (the pipeline, the
bad file as ``data.preferences_train``) and ``rlhf ingest`` (a new batch). Each must stop with
exit code 1 and a message that names the check, the file and the row; ``data/`` must be byte for
byte as it was; ``rlhf run`` must stop at the gate (no training stage ran), register nothing and
leave the champion where it was.

Every kind of bad input below goes through ``rlhf validate``. What ``rlhf run`` and ``rlhf
ingest`` must do does not depend on the check that fails, so two kinds go through them (the
other kinds reach the same gate): ``RUN_AND_INGEST``, chosen for what each door must bring to
the gate itself: the held-out prompts (leakage) and the ``-S`` overrides (chunked reading).

Every bad file is the first 120 pairs of the demo data with one problem planted, so each case
says which check fails first and at which row.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from helpers import POLICY
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

pytestmark = pytest.mark.slow

N_ROWS = 120


@dataclass(frozen=True)
class Case:
    write: Callable[[Path, list[dict]], str]  # (project, good rows) -> path of the bad input
    check: str  # the check that must fail
    line: int  # the first row it names
    says: str = ""  # words the message must hold
    inside: str = ""  # the file in a directory of bad input
    overrides: tuple[str, ...] = field(default_factory=tuple)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _planted(name: str, index: int, *more: int, **change) -> Callable[[Path, list[dict]], str]:
    """Good rows with row ``index`` (0-based, so line index + 1), and rows ``more``, changed."""

    def write(project: Path, rows: list[dict]) -> str:
        rows = [dict(r) for r in rows]
        for i in (index, *more):
            rows[i] |= change
        _jsonl(project / "bad" / name, rows)
        return f"bad/{name}"

    return write


def _raw(name: str, content: Callable[[list[dict]], bytes]) -> Callable[[Path, list[dict]], str]:
    def write(project: Path, rows: list[dict]) -> str:
        (project / "bad").mkdir(exist_ok=True)
        (project / "bad" / name).write_bytes(content(rows))
        return f"bad/{name}"

    return write


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _latin1(rows: list[dict]) -> bytes:
    rows = [dict(r) for r in rows]
    rows[4]["prompt"] += " at the café"
    return _lines(rows).encode("latin-1")  # é is one byte, not UTF-8


def _binary(rows: list[dict]) -> bytes:
    return bytes(range(256)) * 40


def _truncated(rows: list[dict]) -> bytes:
    return _lines(rows).encode()[:-30]  # the last line cut in the middle of a string


def _missing_column(project: Path, rows: list[dict]) -> str:
    _jsonl(project / "bad/missing.jsonl", [{k: r[k] for k in ("prompt", "chosen")} for r in rows])
    return "bad/missing.jsonl"


def _all_duplicates(project: Path, rows: list[dict]) -> str:
    _jsonl(project / "bad/dupes.jsonl", [rows[0]] * len(rows))
    return "bad/dupes.jsonl"


def _broken_csv(project: Path, rows: list[dict]) -> str:
    path = project / "bad/quoting.csv"
    path.parent.mkdir(exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "chosen", "rejected"])
        for i, r in enumerate(rows):
            if i == 20:  # data row 21, line 22: a quote closed in the middle of a field
                fh.write('"Tell me about dogs," she said, "please",Dogs run.,No.\r\n')
            else:
                writer.writerow([r["prompt"], r["chosen"], r["rejected"]])
    return "bad/quoting.csv"


def _parquet_wrong_schema(project: Path, rows: list[dict]) -> str:
    (project / "bad").mkdir(exist_ok=True)
    frame = pd.DataFrame(
        {"question": [r["prompt"] for r in rows], "answer": [r["chosen"] for r in rows]}
    )
    frame.to_parquet(project / "bad/schema.parquet")
    return "bad/schema.parquet"


def _parquet_wrong_types(project: Path, rows: list[dict]) -> str:
    (project / "bad").mkdir(exist_ok=True)
    frame = pd.DataFrame(rows)
    frame["chosen"] = range(len(rows))  # integers where text belongs
    frame.to_parquet(project / "bad/types.parquet")
    return "bad/types.parquet"


def _leakage(project: Path, rows: list[dict]) -> str:
    heldout = json.loads((project / "data/prompts/heldout.jsonl").read_text().splitlines()[0])
    return _planted("leak.jsonl", 3, prompt=heldout["prompt"])(project, rows)


def _mixed_directory(project: Path, rows: list[dict]) -> str:
    """Preference pairs and, beside them, SFT demonstrations in another format."""
    _jsonl(project / "bad/mixed/a.jsonl", rows[:100])
    sft = [json.loads(line) for line in (project / "data/sft/train.jsonl").open()][:20]
    pd.DataFrame(sft)[["prompt", "completion"]].to_csv(project / "bad/mixed/b.csv", index=False)
    return "bad/mixed"


def _large(project: Path, rows: list[dict]) -> str:
    """Three chunks of 500 rows (validate.chunk_rows=500): a pair repeated 1300 rows later, in
    another chunk, is found and named."""
    many = [
        {**rows[i % len(rows)], "prompt": f"{rows[i % len(rows)]['prompt']} ({i})"}
        for i in range(1500)
    ]
    many[1304] = many[4]
    _jsonl(project / "bad/large.jsonl", many)
    return "bad/large.jsonl"


CASES = {
    "empty file": Case(_raw("empty.jsonl", lambda rows: b""), "parseable", 1, "no records"),
    "binary garbage": Case(_raw("binary.jsonl", _binary), "parseable", 1, "binary data"),
    "truncated JSONL line": Case(
        _raw("truncated.jsonl", _truncated), "parseable", N_ROWS, "malformed JSON"
    ),
    "non-UTF-8 encoding": Case(_raw("latin1.jsonl", _latin1), "utf8", 5),
    "UTF-16 encoding": Case(
        _raw("utf16.jsonl", lambda rows: _lines(rows).encode("utf-16")), "parseable", 1, "UTF-16"
    ),
    "missing column": Case(_missing_column, "required_columns", 1, "has no rejected"),
    "list where a string belongs": Case(
        _planted("list.jsonl", 5, chosen=["Dogs", "run"]), "parseable", 6, "is a list"
    ),
    "all duplicates": Case(_all_duplicates, "unique_pairs", 2, "the same pair as"),
    "chosen equal to rejected": Case(
        _planted("same.jsonl", 6, chosen="Dogs run.", rejected="Dogs run."), "chosen_differs", 7
    ),
    "empty string": Case(_planted("empty_string.jsonl", 2, chosen=""), "not_empty", 3),
    "whitespace-only string": Case(
        _planted("whitespace.jsonl", 8, prompt=" \n\t "), "not_empty", 9
    ),
    # 7 of 120 pairs (5.8%) over reward.args.max_length: more than the reward stage may drop.
    "pairs over the reward model's max length": Case(
        _planted("long.jsonl", 10, *range(50, 56), prompt="Tell me about dogs. " * 60),
        "length_tokens",
        11,
    ),
    "CSV with broken quoting": Case(_broken_csv, "parseable", 22, "quoting"),
    "Parquet with the wrong schema": Case(
        _parquet_wrong_schema, "parseable", 1, "matches no known format (keys: answer, question)"
    ),
    "Parquet with the wrong types": Case(_parquet_wrong_types, "string_types", 1),
    "leakage between splits": Case(_leakage, "heldout_overlap", 4),
    "mixed formats in one directory": Case(
        _mixed_directory, "parseable", 2, "a record of sft data", inside="/b.csv"
    ),
    "large file, read in chunks": Case(
        _large, "unique_pairs", 1305, "large.jsonl:5", overrides=("validate.chunk_rows=500",)
    ),
}


# The kinds that also go through `rlhf run` and `rlhf ingest`.
RUN_AND_INGEST = ["leakage between splits", "large file, read in chunks"]


@pytest.fixture(scope="module")
def champion_db(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    """An MLflow store whose registry holds a champion (version 1 of the policy)."""
    root = tmp_path_factory.mktemp("registry")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    client.create_registered_model(POLICY)
    version = client.create_model_version(POLICY, source=str(base_model_dir))
    client.set_registered_model_alias(POLICY, "champion", version.version)
    return root / "mlflow.db"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def bad_project(project: Path, champion_db: Path) -> Path:
    shutil.copy(champion_db, project / "mlflow.db")
    return project


def _good_rows(project: Path) -> list[dict]:
    with (project / "data/preferences/train.jsonl").open() as fh:
        return [json.loads(next(fh)) for _ in range(N_ROWS)]


def _data_files(project: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted((project / "data").rglob("*")) if p.is_file()}


def _assert_names_the_row(case: Case, path: str, text: str) -> None:
    location = f"{path}{case.inside}:{case.line}"
    assert case.check in text and location in text, text
    assert case.says in text, text


@pytest.mark.parametrize("name", list(CASES))
def test_rlhf_validate_refuses(bad_project: Path, rlhf, name: str) -> None:
    case = CASES[name]
    path = case.write(bad_project, _good_rows(bad_project))
    before = _data_files(bad_project)
    overrides = [a for o in case.overrides for a in ("-S", o)]
    code, out, err = rlhf("validate", path, "--heldout", "data/prompts/heldout.jsonl", *overrides)
    assert code == 1, out + err
    _assert_names_the_row(case, path, out)
    assert f"FAIL {case.check}" in out
    # The check's own report, and no validated data from it (rlhf validate never writes the
    # validate stage's outputs, artifacts/validate/).
    assert (bad_project / "artifacts/checks/validate/report.json").exists()
    assert not (bad_project / "artifacts/checks/validate/data").exists()
    assert _data_files(bad_project) == before


@pytest.mark.parametrize("name", RUN_AND_INGEST)
def test_rlhf_run_stops_at_the_gate(bad_project: Path, rlhf, prefect_api, name: str) -> None:
    case = CASES[name]
    path = case.write(bad_project, _good_rows(bad_project))
    before = _data_files(bad_project)
    overrides = [a for o in (f"data.preferences_train={path}", *case.overrides) for a in ("-S", o)]
    code, out, err = rlhf("run", *overrides)
    assert code == 1, out + err
    assert "validation gate failed (" in err and f"preferences_train/{case.check}: " in err, err
    _assert_names_the_row(case, path, err)
    assert not any((bad_project / "artifacts" / s).exists() for s in ("sft", "reward", "policy"))
    assert not (bad_project / "artifacts/validate/data").exists()
    assert _data_files(bad_project) == before
    client = MlflowClient(tracking_uri=f"sqlite:///{bad_project / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{POLICY}'")] == ["1"]
    assert str(client.get_model_version_by_alias(POLICY, "champion").version) == "1"


@pytest.mark.parametrize("name", RUN_AND_INGEST)
def test_rlhf_ingest_refuses(bad_project: Path, rlhf, prefect_api, name: str) -> None:
    case = CASES[name]
    path = case.write(bad_project, _good_rows(bad_project))
    before = _data_files(bad_project)
    overrides = [a for o in case.overrides for a in ("-S", o)]
    code, out, err = rlhf("ingest", path, "--no-commit", "--no-push", *overrides)
    assert code == 1, out + err
    assert "failed the validation gate; data/ is unchanged" in err, err
    _assert_names_the_row(case, path, err)
    assert _data_files(bad_project) == before
