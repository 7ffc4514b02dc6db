"""The validation gate on good and bad files, through ``rlhf validate FILE``.

Every bad file is a good 120-row base file with one planted problem, so each test can say which
check must fail, and that no other check does. The summary's ``FAIL <check>`` / ``WARN <check>``
lines and their ``file:line`` examples are parsed by ``problems``.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
N_ROWS = 120


def base_rows(n: int = N_ROWS) -> list[dict]:
    """Good preference rows: distinct prompts, chosen the longer response in half of them."""
    rows = []
    for i in range(n):
        long, short = f"Topic {i} is calm and worth a visit.", f"Topic {i} is fine."
        chosen, rejected = (long, short) if i % 2 == 0 else (short, long)
        rows.append(
            {
                "id": f"r{i:03d}",
                "prompt": f"Tell me about topic {i}.",
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    # Newline and tab inside a value are not control characters for the gate (line 2).
    rows[1]["chosen"] = "Line one.\nLine two,\twith a tab."
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def problems(out: str) -> dict[str, list[str]]:
    """``{"FAIL chosen_differs": ["bad.jsonl:7", ...], "WARN label_sanity": []}`` from stdout."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        match = re.match(r"\s+(FAIL|WARN) (\w+):", line)
        if match:
            current = found.setdefault(f"{match[1]} {match[2]}", [])
        elif current is not None and line.startswith(" " * 9) and line.strip():
            current.append(line.split()[0])
        else:
            current = None
    return found


def assert_fails(
    result: tuple[int, str, str], check: str, *where: str, also: set[str] = frozenset()
) -> dict[str, list[str]]:
    """Exit code 1, ``FAIL <check>`` naming each ``file:line`` in ``where``, no other failure."""
    code, out, err = result
    assert code == 1, out + err
    found = problems(out)
    assert f"FAIL {check}" in found, out
    for location in where:
        assert location in found[f"FAIL {check}"], out
    failed = {key.split()[1] for key in found if key.startswith("FAIL")}
    assert failed == {check, *also}, out
    return found


def read_report(path: str | Path = "artifacts/checks/validate/report.json") -> dict:
    return json.loads(Path(path).read_text())


# -- good files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_good_file_passes_and_writes_outputs(project, rlhf, suffix):
    writer = write_jsonl if suffix == "jsonl" else write_csv
    writer(f"good.{suffix}", base_rows())

    code, out, err = rlhf("validate", f"good.{suffix}", "--docs")

    assert code == 0, out + err
    assert "Validation gate PASSED" in out
    assert problems(out) == {}, out
    report = read_report()
    assert report["valid"] is True and report["errors"] == 0 and report["warnings"] == 0
    assert report["datasets"]["input"]["rows"] == N_ROWS
    assert {c["check"] for c in report["checks"]} >= {"parseable", "control_chars", "min_rows"}
    assert all(c["success"] for c in report["checks"])
    # The normalised data is written because the data is valid.
    data = Path("artifacts/checks/validate/data/input.jsonl").read_text().splitlines()
    assert len(data) == N_ROWS
    assert json.loads(data[1]) == base_rows()[1]
    assert Path("artifacts/checks/validate/data_docs/index.html").is_file()


@pytest.mark.slow  # every demo file through the gate
def test_default_run_on_demo_data_passes(project, rlhf):
    code, out, err = rlhf("validate")

    assert code == 0, out + err
    assert "Validation gate PASSED" in out
    report = read_report()
    assert report["valid"] is True
    assert set(report["datasets"]) == {
        "preferences_train",
        "preferences_heldout",
        "sft_train",
        "prompts_rl",
        "prompts_heldout",
    }
    for name in report["datasets"]:
        assert Path(f"artifacts/checks/validate/data/{name}.jsonl").is_file()


@pytest.mark.slow  # every demo file through the gate
def test_stage_validate_passes_on_demo_data(project, rlhf):
    code, out, err = rlhf("stage", "validate")

    assert code == 0, out + err
    assert "Validation gate PASSED" in out
    # The stage writes the stage's outputs; `rlhf validate` (a check) never does.
    assert read_report("artifacts/validate/report.json")["valid"] is True
    assert Path("artifacts/validate/data/sft_train.jsonl").is_file()
    assert not Path("artifacts/checks").exists()


# -- one test per check ---------------------------------------------------------------------------


def test_parseable_malformed_json_line(project, rlhf):
    path = write_jsonl("bad.jsonl", base_rows())
    lines = path.read_text().splitlines(keepends=True)
    lines[6] = '{"prompt": "Tell me more.", "chosen": "Sure", \n'
    path.write_text("".join(lines))

    found = assert_fails(rlhf("validate", "bad.jsonl"), "parseable", "bad.jsonl:7")
    assert found["FAIL parseable"] == ["bad.jsonl:7"]


def test_parseable_csv_row_with_too_many_fields(project, rlhf):
    path = write_csv("bad.csv", base_rows())
    lines = path.read_text().splitlines(keepends=True)
    lines[8] = lines[8].rstrip("\r\n") + ",one field too many\r\n"  # data row 8, line 9
    path.write_text("".join(lines), newline="")

    result = rlhf("validate", "bad.csv")
    out = result[1]
    assert_fails(result, "parseable", "bad.csv:9")
    assert "more fields than the header has" in out


def test_required_columns_missing_rejected(project, rlhf):
    rows = [{k: v for k, v in row.items() if k != "rejected"} for row in base_rows()]
    write_jsonl("bad.jsonl", rows)

    result = rlhf("validate", "bad.jsonl")
    out = result[1]
    assert_fails(result, "required_columns", "bad.jsonl:1", "bad.jsonl:2")
    assert "120 rows that lack a required column" in out
    assert "bad.jsonl:1  the record has no rejected" in out


def test_string_types_chosen_is_a_number(project, rlhf):
    rows = base_rows()
    rows[4]["chosen"] = 5
    write_jsonl("bad.jsonl", rows)

    assert_fails(rlhf("validate", "bad.jsonl"), "string_types", "bad.jsonl:5")


def test_not_empty_null_empty_and_whitespace(project, rlhf):
    rows = base_rows()
    rows[2]["prompt"] = None
    rows[4]["chosen"] = ""
    rows[7]["rejected"] = " \t\n "
    write_jsonl("bad.jsonl", rows)

    # An empty string is also shorter than validate.min_chars (1).
    found = assert_fails(
        rlhf("validate", "bad.jsonl"),
        "not_empty",
        "bad.jsonl:3",
        "bad.jsonl:5",
        "bad.jsonl:8",
        also={"length_chars"},
    )
    assert found["FAIL length_chars"] == ["bad.jsonl:5"]


def test_chosen_differs(project, rlhf):
    rows = base_rows()
    rows[6]["chosen"] = rows[6]["rejected"]
    write_jsonl("bad.jsonl", rows)

    found = assert_fails(rlhf("validate", "bad.jsonl"), "chosen_differs", "bad.jsonl:7")
    assert found["FAIL chosen_differs"] == ["bad.jsonl:7"]


def test_unique_pairs(project, rlhf):
    rows = base_rows()
    rows[8] = {**rows[2], "id": "copy-of-r002"}  # the same (prompt, chosen, rejected)
    write_jsonl("bad.jsonl", rows)

    result = rlhf("validate", "bad.jsonl")
    assert_fails(result, "unique_pairs", "bad.jsonl:9")  # the later copy, naming the first
    assert "bad.jsonl:9  the same pair as bad.jsonl:3" in result[1]


def test_length_chars_over_max_chars(project, rlhf):
    rows = base_rows()
    rows[3]["rejected"] = "A sentence that goes on. " * 4  # 100 characters
    write_jsonl("bad.jsonl", rows)

    result = rlhf("validate", "bad.jsonl", "-S", "validate.max_chars=60")
    found = assert_fails(result, "length_chars", "bad.jsonl:4")
    assert found["FAIL length_chars"] == ["bad.jsonl:4"]


def test_length_tokens_over_the_limit_of_the_stage_that_trains_on_them(project, rlhf):
    rows = base_rows()
    long = "word " * 200  # 1000 characters (< max_chars), well over 128 tokens
    rows[5]["chosen"] = long
    write_jsonl("few.jsonl", rows)

    # One pair of 120 over reward.args.max_length: within the 5% the reward stage may drop.
    code, out, _ = rlhf("validate", "few.jsonl")
    assert code == 0, out
    assert (
        "WARN length_tokens: 1 rows where prompt + chosen is over reward.args.max_length = 128 "
        "tokens (allowed: 5% of rows)"
    ) in out

    for i in range(6, 13):  # 8 of 120 (6.7%): more than the stage may lose
        rows[i]["chosen"] = long
    write_jsonl("bad.jsonl", rows)
    found = assert_fails(rlhf("validate", "bad.jsonl"), "length_tokens", "bad.jsonl:6")
    assert found["FAIL length_tokens"][0] == "bad.jsonl:6"
    # The limit is the stage's own: raise it there and the same pairs pass without a word.
    code, out, _ = rlhf("validate", "bad.jsonl", "-S", "reward.args.max_length=1024")
    assert code == 0 and "length_tokens" not in out, out


def test_length_tokens_counts_the_chat_template(project, rlhf, base_model_dir):
    """The template adds tokens around each turn: a pair that fits as plain text may not."""
    from rlhf_tasks.models import load_tokenizer

    tokenizer = load_tokenizer(str(base_model_dir), False, "model")
    rows = base_rows()
    pair = rows[0]
    plain = len(tokenizer(f"{pair['prompt']} {pair['chosen']}", add_special_tokens=False)["input_ids"])
    chat = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["chosen"]}]
    templated = len(tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"])
    assert templated > plain
    write_jsonl("pairs.jsonl", [pair] * 1)
    code, out, _ = rlhf(
        "validate", "pairs.jsonl", "-S", f"validate.max_tokens={templated - 1}", "-S", "validate.min_rows=1",
        "-S", "validate.checks.unique_pairs=off",
    )
    assert code == 1 and "length_tokens" in out, out


def test_utf8_invalid_bytes(project, rlhf):
    path = write_jsonl("bad.jsonl", base_rows())
    lines = path.read_bytes().splitlines(keepends=True)
    lines[5] = b'{"prompt": "Tell me about caf\xff\xfe.", "chosen": "Nice.", "rejected": "No."}\n'
    path.write_bytes(b"".join(lines))

    found = assert_fails(rlhf("validate", "bad.jsonl"), "utf8", "bad.jsonl:6")
    assert found["FAIL utf8"] == ["bad.jsonl:6"]


def test_control_chars(project, rlhf):
    rows = base_rows()
    rows[4]["chosen"] = "A bell\x07 rings."
    write_jsonl("bad.jsonl", rows)

    found = assert_fails(rlhf("validate", "bad.jsonl"), "control_chars", "bad.jsonl:5")
    # Line 2 holds a newline and a tab inside a value: not flagged.
    assert found["FAIL control_chars"] == ["bad.jsonl:5"]


def test_min_rows(project, rlhf):
    write_jsonl("small.jsonl", base_rows(10))

    result = rlhf("validate", "small.jsonl")
    out = result[1]
    assert_fails(result, "min_rows")
    assert "10 rows, need at least 100" in out


def test_min_rows_counts_only_parsed_rows(project, rlhf):
    path = write_jsonl("bad.jsonl", base_rows())
    path.write_text(path.read_text() + "{not json\n")  # 121 lines, 120 parse

    assert_fails(
        rlhf("validate", "bad.jsonl", "-S", "validate.min_rows=121"),
        "min_rows",
        also={"parseable"},
    )


def heldout_rows(shared_prompt: str | None = None) -> list[dict]:
    rows = [
        {"prompt": f"Held-out question {i}?", "chosen": f"Answer {i}, in full.", "rejected": "No."}
        for i in range(20)
    ]
    rows = [
        {**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 2 else r
        for i, r in enumerate(rows)
    ]
    if shared_prompt is not None:
        rows[4]["prompt"] = shared_prompt
    return rows


def test_heldout_overlap(project, rlhf):
    train = base_rows()
    write_jsonl("train.jsonl", train)
    write_jsonl("heldout.jsonl", heldout_rows(shared_prompt=train[10]["prompt"]))

    result = rlhf(
        "validate", "train.jsonl", "--heldout", "heldout.jsonl", "-S", "validate.min_rows=10"
    )
    found = assert_fails(result, "heldout_overlap", "train.jsonl:11")
    assert found["FAIL heldout_overlap"] == ["train.jsonl:11"]


def test_heldout_without_overlap_passes(project, rlhf):
    write_jsonl("train.jsonl", base_rows())
    write_jsonl("heldout.jsonl", heldout_rows())

    code, out, err = rlhf(
        "validate", "train.jsonl", "--heldout", "heldout.jsonl", "-S", "validate.min_rows=10"
    )
    assert code == 0, out + err
    report = read_report()
    assert set(report["datasets"]) == {"input", "heldout"}
    assert any(c["check"] == "heldout_overlap" and c["success"] for c in report["checks"])


def longer_chosen_rows() -> list[dict]:
    return [
        {**row, "chosen": max(pair, key=len), "rejected": min(pair, key=len)}
        for row in base_rows()
        for pair in [(row["chosen"], row["rejected"])]
    ]


def test_label_sanity_warns_by_default(project, rlhf):
    write_jsonl("longer.jsonl", longer_chosen_rows())

    code, out, err = rlhf("validate", "longer.jsonl")

    assert code == 0, out + err
    found = problems(out)
    assert set(found) == {"WARN label_sanity"}, out
    assert "chosen is the longer response in 100.0% of pairs" in out
    report = read_report()
    assert report["valid"] is True and report["warnings"] == 1


def test_label_sanity_as_error_fails(project, rlhf):
    write_jsonl("longer.jsonl", longer_chosen_rows())

    result = rlhf("validate", "longer.jsonl", "-S", "validate.checks.label_sanity=error")
    assert_fails(result, "label_sanity")


def test_label_sanity_ignores_pairs_of_equal_length(project, rlhf):
    rows = longer_chosen_rows()
    # 100 pairs of equal length would dilute "always longer" to 17% if they counted.
    for row in rows[20:]:
        row["rejected"] = row["chosen"][:-1] + "!"
    write_jsonl("ties.jsonl", rows)

    code, out, _ = rlhf("validate", "ties.jsonl")

    assert code == 0
    assert "chosen is the longer response in 100.0% of pairs" in out


def test_label_sanity_needs_enough_pairs_to_judge(project, rlhf):
    rows = longer_chosen_rows()
    for row in rows[19:]:  # 19 pairs of unequal length: one short of label_sanity_min_pairs
        row["rejected"] = row["chosen"][:-1] + "!"
    write_jsonl("few.jsonl", rows)

    code, out, _ = rlhf("validate", "few.jsonl")
    assert code == 0
    assert "label_sanity" not in out
    assert all(c["check"] != "label_sanity" for c in read_report()["checks"])

    code, out, _ = rlhf("validate", "few.jsonl", "-S", "validate.label_sanity_min_pairs=19")
    assert "WARN label_sanity" in out


# -- severities, report, outputs ------------------------------------------------------------------


# `off` is how params.yaml's comments and the config docstring spell it; YAML 1.1 reads a bare
# off as the boolean false, which the config must still take as the severity "off".
@pytest.mark.parametrize("severity", ["off", '"off"'])
def test_check_set_to_off_is_not_run(project, rlhf, severity):
    rows = base_rows()
    rows[6]["chosen"] = rows[6]["rejected"]
    write_jsonl("bad.jsonl", rows)

    code, out, err = rlhf(
        "validate", "bad.jsonl", "-S", f"validate.checks.chosen_differs={severity}"
    )

    assert code == 0, out + err
    assert "chosen_differs" not in out
    checks = {c["check"] for c in read_report()["checks"]}
    assert "chosen_differs" not in checks
    assert "unique_pairs" in checks  # the other checks still run


def test_report_lists_failed_checks_with_examples(project, rlhf, tmp_path):
    rows = base_rows()
    rows[6]["chosen"] = rows[6]["rejected"]
    rows[4]["chosen"] = "A bell\x07 rings."
    write_jsonl("bad.jsonl", rows)
    out_dir = tmp_path / "elsewhere"

    code, out, err = rlhf("validate", "bad.jsonl", "--out", out_dir)

    assert code == 1, out + err
    report = read_report(out_dir / "report.json")
    assert report["valid"] is False
    assert report["errors"] == 2
    failed = {c["check"]: c for c in report["checks"] if not c["success"]}
    assert set(failed) == {"chosen_differs", "control_chars"}
    for check, line in [("chosen_differs", 7), ("control_chars", 5)]:
        examples = failed[check]["examples"]
        assert [{"file": e["file"], "line": e["line"]} for e in examples] == [
            {"file": "bad.jsonl", "line": line}
        ]
        assert failed[check]["unexpected"] == 1
    # Data Docs only when asked for (`--docs`): a check is read in the terminal first.
    assert not (out_dir / "data_docs").exists()
    assert "Data Docs: not built (`rlhf validate --docs` builds them)" in out
    assert not (out_dir / "data").exists()
    assert not Path("artifacts/checks/validate").exists()  # --out replaces the default location
    assert not Path("artifacts/validate").exists()  # a check never writes the stage's outputs


def test_normalised_data_written_only_when_valid(project, rlhf):
    write_jsonl("good.jsonl", base_rows())
    code, out, err = rlhf("validate", "good.jsonl")
    assert code == 0, out + err
    assert Path("artifacts/checks/validate/data/input.jsonl").is_file()

    rows = base_rows()
    rows[6]["chosen"] = rows[6]["rejected"]
    write_jsonl("bad.jsonl", rows)
    code, out, err = rlhf("validate", "bad.jsonl")

    assert code == 1, out + err
    assert read_report()["valid"] is False
    # The data of the earlier, valid run is gone: later stages must not read stale data.
    assert not Path("artifacts/checks/validate/data").exists()


# -- usage errors and the real console script ----------------------------------------------------


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["validate", "nope.jsonl"], "nope.jsonl"),
        (["validate", "good.jsonl", "--heldout", "missing/held.jsonl"], "missing/held.jsonl"),
    ],
)
def test_missing_path_exits_2(project, rlhf, argv, missing):
    write_jsonl("good.jsonl", base_rows())

    code, out, err = rlhf(*argv)

    assert code == 2
    assert missing in err
    assert "no such file or directory" in err
    assert "Traceback" not in out + err
    assert not Path("artifacts/checks/validate/report.json").exists()


@pytest.mark.slow  # the console script in a process of its own
def test_console_script_exits_1_without_traceback(project):
    rows = base_rows()
    rows[6]["chosen"] = rows[6]["rejected"]
    write_jsonl("bad.jsonl", rows)

    proc = subprocess.run(
        [str(VENV_BIN / "rlhf"), "validate", "bad.jsonl"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "FAIL chosen_differs" in proc.stdout
    assert "bad.jsonl:7" in proc.stdout
