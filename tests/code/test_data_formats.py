"""rlhf_tasks.data.load on literal inputs: file types, record formats, data kinds, bad rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from rlhf_tasks.data import KeyIndex, iter_chunks, load
from rlhf_tasks.errors import ConfigError

# Commas, quotes, a newline, non-ASCII text and a zero margin: what CSV quoting and "optional
# column present?" logic get wrong first.
ROWS = [
    {
        "prompt": "What is 2+2?",
        "chosen": "4.",
        "rejected": "5, I think.",
        "id": "p1",
        "annotator": "ann-1",
        "margin": 2.0,
    },
    {
        "prompt": "Name a colour, please.",
        "chosen": 'Blue, "sky" blue.',
        "rejected": "Seven.",
        "id": "p2",
        "annotator": "ann-2",
        "margin": 0.5,
    },
    {
        "prompt": "Say hi\nto the café.",
        "chosen": "Hi, café ☕!",
        "rejected": "No.",
        "id": "p3",
        "annotator": "ann-1",
        "margin": 0.0,
    },
]
PREF_COLUMNS = ["prompt", "chosen", "rejected", "id", "annotator", "margin"]
PROVENANCE = ["_file", "_line", "_format", "_missing", "_parse_error"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pd.DataFrame(records).to_parquet(path)
    return path


WRITERS = {
    "jsonl": lambda d, rows: write_jsonl(d / "x.jsonl", rows),
    "json_list": lambda d, rows: write_json(d / "x.json", rows),
    "json_data": lambda d, rows: write_json(d / "x.json", {"data": rows}),
    "csv": lambda d, rows: write_csv(d / "x.csv", rows),
    "parquet": lambda d, rows: write_parquet(d / "x.parquet", rows),
}


def records(ds) -> list[dict]:
    """The normalised rows without provenance columns."""
    columns = [c for c in ds.frame.columns if not c.startswith("_")]
    return ds.frame[columns].to_dict(orient="records")


def one(tmp_path: Path, record: dict, kind: str | None = None) -> dict:
    """Load a one-record JSONL file; return its row, provenance included."""
    ds = load([write_jsonl(tmp_path / "one.jsonl", [record])], kind=kind)
    assert len(ds.frame) == 1
    return ds.frame.iloc[0].to_dict()


# -- file types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, lines",
    [
        ("jsonl", [1, 2, 3]),
        ("json_list", [1, 2, 3]),
        ("json_data", [1, 2, 3]),
        # CSV: header on line 1; the quoted newline makes the third record span lines 4-5, and
        # a record is named by its first physical line.
        ("csv", [2, 3, 4]),
        ("parquet", [1, 2, 3]),
    ],
)
def test_explicit_rows_load_the_same_from_every_file_type(tmp_path, fmt, lines):
    path = WRITERS[fmt](tmp_path, ROWS)

    ds = load([path])

    assert ds.kind == "preferences"
    assert ds.files == [path]
    assert list(ds.frame.columns) == PREF_COLUMNS + PROVENANCE
    assert records(ds) == ROWS
    assert isinstance(records(ds)[0]["margin"], float)
    assert list(ds.frame["_line"]) == lines
    assert list(ds.frame["_file"]) == [str(path)] * 3
    assert list(ds.frame["_format"]) == ["explicit"] * 3
    assert list(ds.frame["_parse_error"]) == [None] * 3


def test_optional_columns_absent_are_not_invented(tmp_path):
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ROWS]

    ds = load([write_jsonl(tmp_path / "x.jsonl", rows)])

    assert list(ds.frame.columns) == ["prompt", "chosen", "rejected", *PROVENANCE]
    assert records(ds) == rows


def test_csv_margin_is_a_number_and_an_empty_cell_no_margin(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,chosen,rejected,margin\nQ1,A,B,1.5\nQ2,A,B,\nQ3,A,B,lots\n")

    frame = load([path]).frame

    assert frame["margin"].tolist() == [1.5, None, None]
    assert frame["_parse_error"].tolist()[:2] == [None, None]
    assert "margin" in frame["_parse_error"][2] and "'lots'" in frame["_parse_error"][2]


def test_byte_order_mark_is_not_part_of_the_first_column_or_line(tmp_path):
    bom = "\ufeff".encode()
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(bom + b"prompt,chosen,rejected\r\nQ,A,B\r\n")
    jsonl_path = tmp_path / "notepad.jsonl"
    jsonl_path.write_bytes(bom + b'{"prompt": "Q", "chosen": "A", "rejected": "B"}\n')
    json_path = tmp_path / "list.json"
    json_path.write_bytes(bom + b'[{"prompt": "Q", "chosen": "A", "rejected": "B"}]')

    for path in (csv_path, jsonl_path, json_path):
        ds = load([path])
        assert records(ds) == [{"prompt": "Q", "chosen": "A", "rejected": "B"}], path
        assert ds.frame["_parse_error"].tolist() == [None], path


def test_directory_of_mixed_files_is_read_in_sorted_order(tmp_path):
    root = tmp_path / "prefs"
    (root / "sub").mkdir(parents=True)
    # Created in an order that differs from the sorted one.
    third = write_parquet(root / "sub" / "a.parquet", [ROWS[2]])
    second = write_csv(root / "b.csv", [ROWS[1]])
    first = write_jsonl(root / "a.jsonl", [ROWS[0]])
    (root / "notes.txt").write_text("not data")

    ds = load([root])

    assert ds.files == [first, second, third]
    assert records(ds) == ROWS
    assert list(ds.frame["_file"]) == [str(first), str(second), str(third)]
    assert list(ds.frame["_line"]) == [1, 2, 1]


def test_several_paths_are_concatenated_in_the_given_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[1:])

    ds = load([b, a])

    assert records(ds) == [*ROWS[1:], ROWS[0]]


# -- record formats -----------------------------------------------------------------------------


def test_implicit_hh_single_turn(tmp_path):
    row = one(
        tmp_path,
        {
            "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
            "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris, I think.",
            "id": "hh-1",
        },
    )

    assert row["_format"] == "implicit"
    assert row["prompt"] == "What is the capital of France?"
    # The replies share "Paris" but the prompt ends at the last shared "Assistant:" turn.
    assert row["chosen"] == "Paris."
    assert row["rejected"] == "Paris, I think."
    assert row["id"] == "hh-1"
    assert row["_parse_error"] is None


def test_implicit_hh_multi_turn_prompt_is_the_transcript(tmp_path):
    history = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?"
    row = one(
        tmp_path,
        {
            "chosen": history + "\n\nAssistant: It is 4.",
            "rejected": history + "\n\nAssistant: It is 5.",
        },
    )

    assert row["_format"] == "implicit"
    assert row["prompt"] == (
        "Human: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?"
    )
    assert row["chosen"] == "It is 4."
    assert row["rejected"] == "It is 5."


def test_implicit_without_hh_markers_is_not_split(tmp_path):
    row = one(tmp_path, {"chosen": "Paris.", "rejected": "Rome."})

    assert row["_format"] == "explicit"
    assert row["prompt"] is None and row["_missing"] == "prompt"  # the gate reports the row
    assert (row["chosen"], row["rejected"]) == ("Paris.", "Rome.")


def test_implicit_hh_without_a_shared_prompt_is_a_row_error(tmp_path):
    row = one(
        tmp_path,
        {
            "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
            "rejected": "\n\nHuman: What is 3+3?\n\nAssistant: 6.",
        },
    )

    assert row["_format"] is None
    assert row["_parse_error"].startswith("no shared")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_conversational_with_explicit_prompt(tmp_path):
    row = one(
        tmp_path,
        {
            "prompt": [user("What is 2+2?")],
            "chosen": [assistant("4.")],
            "rejected": [assistant("5.")],
            "annotator": "ann-3",
        },
    )

    assert row["_format"] == "conversational"
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("What is 2+2?", "4.", "5.")
    assert row["annotator"] == "ann-3"


def test_conversational_prompt_with_system_turn_is_a_transcript(tmp_path):
    row = one(
        tmp_path,
        {
            "prompt": [{"role": "system", "content": "Be brief."}, user("What is 2+2?")],
            "chosen": [assistant("4.")],
            "rejected": [assistant("5.")],
        },
    )

    assert row["prompt"] == "System: Be brief.\n\nHuman: What is 2+2?"


def test_conversational_implicit_prompt_is_the_shared_prefix(tmp_path):
    ds = load(
        [
            write_jsonl(
                tmp_path / "conv.jsonl",
                [
                    {
                        "chosen": [user("What is 2+2?"), assistant("4.")],
                        "rejected": [user("What is 2+2?"), assistant("5.")],
                    },
                    {
                        "chosen": [user("Hi."), assistant("Hello!"), user("2+2?"), assistant("4")],
                        "rejected": [
                            user("Hi."),
                            assistant("Hello!"),
                            user("2+2?"),
                            assistant("5"),
                        ],
                    },
                ],
            )
        ]
    )

    assert records(ds) == [
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
        {
            "prompt": "Human: Hi.\n\nAssistant: Hello!\n\nHuman: 2+2?",
            "chosen": "4",
            "rejected": "5",
        },
    ]
    assert list(ds.frame["_format"]) == ["conversational"] * 2


def test_conversational_rows_load_from_parquet(tmp_path):
    path = write_parquet(
        tmp_path / "conv.parquet",
        [
            {
                "prompt": [user("What is 2+2?")],
                "chosen": [assistant("4.")],
                "rejected": [assistant("5.")],
            }
        ],
    )

    ds = load([path])

    assert records(ds) == [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}]
    assert list(ds.frame["_format"]) == ["conversational"]


def test_conversational_response_not_ending_with_assistant_is_a_row_error(tmp_path):
    row = one(
        tmp_path,
        {"prompt": [user("Q")], "chosen": [user("not a reply")], "rejected": [assistant("A")]},
    )

    assert row["_parse_error"] == "'chosen' must end with an assistant message"
    assert row["_format"] is None


def test_sft_prompt_completion_and_messages(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Describe rain.", "completion": "Rain falls from clouds.", "id": "s1"},
            {"messages": [user("Describe snow."), assistant("Snow is cold.")]},
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    user("Describe fog."),
                    assistant("Fog is a low cloud."),
                ]
            },
            {"prompt": [user("Describe hail.")], "completion": [assistant("Hail is ice.")]},
        ],
    )

    ds = load([path])

    assert ds.kind == "sft"
    assert list(ds.frame.columns) == ["prompt", "completion", "id", *PROVENANCE]
    assert records(ds) == [
        {"prompt": "Describe rain.", "completion": "Rain falls from clouds.", "id": "s1"},
        {"prompt": "Describe snow.", "completion": "Snow is cold.", "id": None},
        {
            "prompt": "System: Be kind.\n\nHuman: Describe fog.",
            "completion": "Fog is a low cloud.",
            "id": None,
        },
        {"prompt": "Describe hail.", "completion": "Hail is ice.", "id": None},
    ]
    assert list(ds.frame["_format"]) == [
        "prompt_completion",
        "conversational",
        "conversational",
        "prompt_completion",
    ]


def test_prompts_only(tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "Describe apples.", "id": "q1"}, {"prompt": [user("Describe pears.")]}],
    )

    ds = load([path])

    assert ds.kind == "prompts"
    assert ds.text_columns == ("prompt",)
    assert list(ds.frame.columns) == ["prompt", "id", *PROVENANCE]
    assert records(ds) == [
        {"prompt": "Describe apples.", "id": "q1"},
        {"prompt": "Describe pears.", "id": None},
    ]
    assert list(ds.frame["_format"]) == ["prompt_only"] * 2


# -- kinds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, kind",
    [
        ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "preferences"),
        (
            {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"},
            "preferences",
        ),
        ({"prompt": "Q", "rejected": "B"}, "preferences"),
        ({"prompt": "Q", "completion": "A"}, "sft"),
        ({"messages": [user("Q"), assistant("A")]}, "sft"),
        ({"prompt": "Q"}, "prompts"),
    ],
)
def test_kind_is_detected_from_the_record(tmp_path, record, kind):
    assert load([write_jsonl(tmp_path / "x.jsonl", [record])]).kind == kind


def test_kind_is_detected_from_the_first_record_that_parses(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "Q", "chosen": \n{"prompt": "Q", "completion": "A"}\n')

    ds = load([path])

    assert ds.kind == "sft"
    assert list(ds.frame["_line"]) == [1, 2]


def test_given_kind_overrides_detection(tmp_path):
    ds = load([write_jsonl(tmp_path / "x.jsonl", ROWS)], kind="prompts")

    assert ds.kind == "prompts"
    assert records(ds) == [
        {"prompt": r["prompt"], "id": r["id"], "annotator": r["annotator"], "margin": r["margin"]}
        for r in ROWS
    ]


def test_unknown_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown data kind 'pairs'"):
        load([write_jsonl(tmp_path / "x.jsonl", ROWS)], kind="pairs")


# -- bad rows -----------------------------------------------------------------------------------


def test_malformed_jsonl_lines_are_kept_with_their_error_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n"
        '{"prompt": "Q", "chosen": "A", \n'  # line 2: truncated
        "\n"  # line 3: blank, skipped
        "[1, 2]\n"  # line 4: not an object
         + json.dumps(ROWS[1]) + "\n"
    )

    ds = load([path])

    frame = ds.frame
    assert list(frame["_line"]) == [1, 2, 4, 5]
    errors = list(frame["_parse_error"])
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("malformed JSON:")
    assert errors[2] == "expected a JSON object, got list"
    assert records(ds)[0] == ROWS[0] and records(ds)[3] == ROWS[1]
    # A row that did not parse carries no fields.
    assert all(v is None for v in records(ds)[1].values())
    assert list(frame["_format"]) == ["explicit", None, None, "explicit"]


def test_malformed_json_file_is_one_error_row_at_its_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"prompt": "Q", "chosen": "A", "rejected": "B"},\n  {oops}\n]\n')

    frame = load([path]).frame

    assert len(frame) == 1
    assert frame["_line"][0] == 3
    assert frame["_parse_error"][0].startswith("malformed JSON:")


def test_json_object_without_data_list_is_an_error_row(tmp_path):
    frame = load([write_json(tmp_path / "x.json", {"rows": ROWS})]).frame

    assert frame["_parse_error"].tolist() == [
        'expected a JSON list of records (or {"data": [...]})'
    ]


def test_csv_row_with_too_many_fields_is_kept_as_an_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,chosen,rejected\nQ1,A,B\nQ2,A,B,extra\nQ3,A,B\n")

    frame = load([path]).frame

    assert frame["_line"].tolist() == [2, 3, 4]
    assert frame["_parse_error"].tolist() == [None, "more fields than the header has (3)", None]
    assert frame["prompt"].tolist() == ["Q1", None, "Q3"]


def test_invalid_utf8_becomes_replacement_character(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(
        b'{"prompt": "caf\xff\xfe", "chosen": "na\xc3\xafve \xe2\x98\x95", "rejected": "B"}\n'
    )
    csv_path = tmp_path / "x.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\ncaf\xff\xfe,na\xc3\xafve \xe2\x98\x95,B\n")
    escaped = tmp_path / "escaped.jsonl"  # a lone surrogate written as a JSON escape
    escaped.write_text('{"prompt": "caf\\ud800\\ud800", "chosen": "naïve ☕", "rejected": "B"}\n')

    for path in (jsonl, csv_path, escaped):
        row = load([path]).frame.iloc[0]
        assert row["prompt"] == "caf\ufffd\ufffd", path
        assert row["chosen"] == "naïve ☕", path  # valid UTF-8 is untouched
        assert row["_parse_error"] is None, path


# -- paths --------------------------------------------------------------------------------------


def test_unsupported_suffix_is_a_config_error(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(json.dumps(ROWS[0]))

    with pytest.raises(ConfigError, match="unsupported file type") as info:
        load([path])
    assert str(path) in str(info.value)


def test_missing_path_is_a_config_error(tmp_path):
    path = tmp_path / "nope.jsonl"

    with pytest.raises(ConfigError, match="no such file or directory") as info:
        load([path])
    assert str(path) in str(info.value)


def test_directory_without_data_files_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("nothing here")

    with pytest.raises(ConfigError, match="holds no"):
        load([tmp_path / "empty"])


def test_iter_chunks_reads_files_in_chunks_of_at_most_chunk_rows(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    row = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    first.write_text("".join(json.dumps({**row, "id": i}) + "\n" for i in range(5)))
    second.write_text("".join(json.dumps({**row, "id": i}) + "\n" for i in range(5, 7)))

    chunks = list(iter_chunks([first, second], chunk_rows=3))

    assert [len(c.frame) for c in chunks] == [3, 3, 1]
    assert [i for c in chunks for i in c.frame["id"]] == list(range(7))
    frames = [c.frame for c in chunks]
    lines = [
        (Path(f).name, n) for fr in frames for f, n in fr[["_file", "_line"]].itertuples(False)
    ]
    assert lines == [*(("a.jsonl", n) for n in range(1, 6)), ("b.jsonl", 1), ("b.jsonl", 2)]
    assert {c.kind for c in chunks} == {"preferences"}


def test_key_index_names_the_first_occurrence_across_calls():
    index = KeyIndex()
    assert index.add([("a", "b"), ("c", "d"), (" a ", "b")], [10, 11, 12]) == [None, None, 10]
    assert index.add([("c", "d"), ("e", "f"), ("e", "f")], [13, 14, 15]) == [11, None, 14]
    assert index.add([], []) == []
