"""Public data formats (ShareGPT, Alpaca, OpenAI messages, UltraFeedback, HH-RLHF, TRL, Hugging
Face datasets on disk): samples written in each one's real shape load to the same normalised
rows, and each bad shape is refused naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_tasks.config import DataConfig
from rlhf_tasks.data import Reading, load
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.formats import prompt_messages

SYSTEM = "You answer briefly."
# One multi-turn preference pair and one single-turn pair, as the pipeline normalises them.
PAIRS = [
    {
        "prompt": "System: You answer briefly.\n\nHuman: Name a cat.\n\nAssistant: Tom."
        "\n\nHuman: And a dog?",
        "chosen": "Rex.",
        "rejected": "Cats are nice.",
    },
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
]
SFT = [
    {
        "prompt": "System: You answer briefly.\n\nHuman: Name a cat.\n\nAssistant: Tom."
        "\n\nHuman: And a dog?",
        "completion": "Rex.",
    },
    {"prompt": "What is 2+2?", "completion": "4."},
]


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def h(text: str) -> dict:  # ShareGPT's message shape
    return {"from": "human", "value": text}


def g(text: str) -> dict:
    return {"from": "gpt", "value": text}


PREFERENCE_SAMPLES = {
    "sharegpt": [
        {
            "system": SYSTEM,
            "conversations": [h("Name a cat."), g("Tom."), h("And a dog?")],
            "chosen": g("Rex."),
            "rejected": g("Cats are nice."),
        },
        {"conversations": [h("What is 2+2?")], "chosen": [g("4.")], "rejected": [g("5.")]},
    ],
    "alpaca": [
        {
            "system": SYSTEM,
            "history": [["Name a cat.", "Tom."]],
            "instruction": "And a dog?",
            "input": "",
            "output": ["Rex.", "Cats are nice."],
        },
        {"instruction": "What is 2+2?", "input": "", "chosen": "4.", "rejected": "5."},
    ],
    "ultrafeedback": [
        {
            "prompt": [
                {"role": "system", "content": SYSTEM},
                u("Name a cat."),
                a("Tom."),
                u("And a dog?"),
            ],
            "chosen": [a("Rex.")],
            "rejected": [a("Cats are nice.")],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        },
        {
            "prompt": "What is 2+2?",
            "chosen": [u("What is 2+2?"), a("4.")],
            "rejected": [u("What is 2+2?"), a("5.")],
            "score_chosen": 9.0,
            "score_rejected": 8.5,
        },
    ],
    "openai_parts": [
        {
            "chosen": [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                u([{"type": "text", "text": "Name a cat."}]),
                a("Tom."),
                u("And a dog?"),
                a([{"type": "text", "text": "Rex."}]),
            ],
            "rejected": [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                u([{"type": "text", "text": "Name a cat."}]),
                a("Tom."),
                u("And a dog?"),
                a("Cats are nice."),
            ],
        },
        {"prompt": [u("What is 2+2?")], "chosen": [a("4.")], "rejected": [a("5.")]},
    ],
    "hh": [
        {
            "chosen": "\n\nHuman: Name a cat.\n\nAssistant: Tom.\n\nHuman: And a dog?"
            "\n\nAssistant: Rex.",
            "rejected": "\n\nHuman: Name a cat.\n\nAssistant: Tom.\n\nHuman: And a dog?"
            "\n\nAssistant: Cats are nice.",
        },
        {
            "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
            "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5.",
        },
    ],
}
# What each sample's first pair loses against PAIRS (HH has no system turn) and its margins.
NO_SYSTEM = {"hh"}
MARGINS = {"ultrafeedback": [5.0, 0.5]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def records(ds) -> list[dict]:
    columns = [c for c in ds.frame.columns if not c.startswith("_")]
    return [
        {k: v for k, v in row.items() if v is not None}
        for row in ds.frame[columns].to_dict(orient="records")
    ]


def errors(ds) -> list[str | None]:
    return list(ds.frame["_parse_error"])


@pytest.mark.parametrize("name", list(PREFERENCE_SAMPLES))
def test_each_preference_format_loads_to_the_same_rows(tmp_path, name):
    path = write_jsonl(tmp_path / f"{name}.jsonl", PREFERENCE_SAMPLES[name])

    ds = load([path])

    assert ds.kind == "preferences"
    assert errors(ds) == [None, None]
    expected = [dict(p) for p in PAIRS]
    if name in NO_SYSTEM:
        expected[0]["prompt"] = expected[0]["prompt"].removeprefix(f"System: {SYSTEM}\n\n")
    for row, margin in zip(expected, MARGINS.get(name, [None, None]), strict=True):
        if margin is not None:
            row["margin"] = margin
    assert records(ds) == expected


def test_a_multi_turn_prompt_reaches_the_chat_template_as_turns():
    assert prompt_messages(PAIRS[0]["prompt"]) == [
        {"role": "system", "content": SYSTEM},
        u("Name a cat."),
        a("Tom."),
        u("And a dog?"),
    ]


SFT_SAMPLES = {
    "sharegpt": [
        {
            "system": SYSTEM,
            "conversations": [h("Name a cat."), g("Tom."), h("And a dog?"), g("Rex.")],
        },
        {"conversations": [h("What is 2+2?"), g("4.")]},
    ],
    "alpaca": [
        {
            "system": SYSTEM,
            "history": [["Name a cat.", "Tom."]],
            "instruction": "And a dog?",
            "output": "Rex.",
        },
        {"instruction": "What is 2+2?", "output": "4."},
    ],
    "openai": [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                u("Name a cat."),
                a("Tom."),
                u([{"type": "text", "text": "And a dog?"}]),
                a("Rex."),
            ]
        },
        {"messages": [u("What is 2+2?"), a("4.")]},
    ],
}


@pytest.mark.parametrize("name", list(SFT_SAMPLES))
def test_each_sft_format_loads_to_the_same_rows(tmp_path, name):
    ds = load([write_jsonl(tmp_path / f"{name}.jsonl", SFT_SAMPLES[name])])

    assert ds.kind == "sft"
    assert errors(ds) == [None, None]
    assert records(ds) == SFT


def test_prompts_from_sharegpt_alpaca_and_openai(tmp_path):
    rows = [
        {"conversations": [h("Name a cat.")]},
        {"instruction": "Name this dog.", "input": "It barks."},
        {"messages": [u("Name a bird.")]},
    ]
    ds = load([write_jsonl(tmp_path / "p.jsonl", rows)], kind="prompts")

    assert errors(ds) == [None] * 3
    assert records(ds) == [
        {"prompt": "Name a cat."},
        {"prompt": "Name this dog.\nIt barks."},
        {"prompt": "Name a bird."},
    ]


def test_a_hugging_face_datasetdict_maps_train_and_heldout_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = PREFERENCE_SAMPLES["sharegpt"]
    # Arrow needs one type per column: the ShareGPT sample's chosen is a list in both rows here.
    for row in rows:
        row["chosen"], row["rejected"] = (
            [row["chosen"]] if isinstance(row["chosen"], dict) else row["chosen"],
            [row["rejected"]] if isinstance(row["rejected"], dict) else row["rejected"],
        )
        row.setdefault("system", None)
    splits = DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[1:])})
    splits.save_to_disk(str(tmp_path / "hf"))

    train = load([tmp_path / "hf"])
    heldout = load([tmp_path / "hf"], heldout=True)
    one_split = load([tmp_path / "hf" / "test"])

    assert records(train) == PAIRS
    assert records(heldout) == records(one_split) == PAIRS[1:]
    assert list(train.frame["_line"]) == [1, 2]


def test_a_datasetdict_without_the_split_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"prompt": "Q"}])}).save_to_disk(str(tmp_path / "hf"))

    with pytest.raises(ConfigError, match=r"splits train, none of them test / validation"):
        load([tmp_path / "hf"], heldout=True)


def test_columns_rename_a_files_own_keys(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "Q?", "good": "A.", "bad": "B."}])
    reading = Reading(columns={"prompt": "question", "chosen": "good", "rejected": "bad"})

    assert records(load([path], reading=reading)) == [
        {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
    ]


@pytest.mark.parametrize(
    "record, kind, message",
    [
        # Unpaired (KTO-style) feedback is neither pairs nor SFT targets.
        (
            {"messages": [u("Q"), a("A")], "label": False},
            "sft",
            "unpaired feedback (a completion or messages with a 'label'",
        ),
        (
            {"prompt": "Q", "completion": "A", "label": True},
            "preferences",
            "unpaired feedback",
        ),
        # A record of no known shape names every format tried and the keys it has.
        (
            {"question": "Q", "answer": "A"},
            "preferences",
            "the record matches no known format (keys: answer, question). Formats tried: sharegpt "
            "{conversations",
        ),
        (
            {"messages": [u([{"type": "image_url", "image_url": {"url": "x"}}]), a("A")]},
            "sft",
            "'messages[0].content' has a content part of type 'image_url'",
        ),
        (
            {
                "conversations": [{"from": "narrator", "value": "Q"}],
                "chosen": g("A"),
                "rejected": g("B"),
            },
            "preferences",
            "'conversations'[0] has role 'narrator'",
        ),
        (
            {"conversations": [h("Q"), g("A")], "chosen": g("B"), "rejected": g("C")},
            "preferences",
            "'conversations' must end with a user message",
        ),
        (
            {"instruction": "Q", "output": ["A", "B", "C"]},
            "preferences",
            "a ranking 'output' must be [chosen, rejected], got 3 answers",
        ),
        (
            {"instruction": "Q", "history": [["only the user"]], "output": "A"},
            "sft",
            "'history'[0] must be a [user, assistant] pair",
        ),
        (
            {"conversations": [h("Q"), g("A")]},
            "preferences",
            "a record of sft data (keys: conversations) in a data set of preferences",
        ),
    ],
)
def test_bad_shapes_are_row_errors_that_say_what_is_wrong(tmp_path, record, kind, message):
    ds = load([write_jsonl(tmp_path / "x.jsonl", [record])], kind=kind)

    assert ds.frame.iloc[0]["_parse_error"].startswith(message)


def test_a_chosen_format_refuses_records_of_another(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])

    ds = load([path], reading=Reading(format="sharegpt"))

    assert errors(ds) == [
        "not a sharegpt record {conversations, [system], [chosen, rejected]} "
        "(keys: chosen, prompt, rejected)"
    ]


def test_the_data_section_checks_format_and_columns():
    with pytest.raises(ValueError, match="unknown format 'sharegtp'"):
        DataConfig(format="sharegtp")
    with pytest.raises(ValueError, match="columns maps unknown field"):
        DataConfig(columns={"answer": "output"})
    assert DataConfig(format="alpaca").reading() == Reading("alpaca", {})
    assert "format" not in DataConfig().roles()
