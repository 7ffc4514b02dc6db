"""How Label Studio's export becomes preference pairs (collect.pairs), on exports written here:
the majority, annotators' agreement, and the tasks that stop a pull. The real server's side is
tests/flows/test_collect.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_tasks import collect
from rlhf_tasks.config import Params, load_params
from rlhf_tasks.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
WHERE = {"url": "http://127.0.0.1:8080", "project_id": 7}
PEOPLE = {1: "a@x.org", 2: "b@x.org", 3: "c@x.org"}


def _task(task_id: int, *labels: tuple[int | None, str], strength: str | None = None) -> dict:
    prompt, left, right = f"Prompt {task_id}?", f"Left answer {task_id}.", f"Right {task_id}."
    data = {"prompt": prompt, "left": left, "right": right, "left_model": "p/2",
            "right_model": "p/3", "digest": collect.digest(prompt, left, right)}  # fmt: skip
    annotations = []
    for n, (who, choice) in enumerate(labels):
        result = [{"from_name": "preference", "value": {"choices": [choice]}}]
        if strength:
            result.append({"from_name": "strength", "value": {"choices": [strength]}})
        annotations.append({"id": 100 * task_id + n, "completed_by": who, "result": result})
    return {"id": task_id, "data": data, "annotations": annotations}


@pytest.fixture
def params() -> Params:
    return load_params(ROOT / "params.yaml", ["collect.min_shared=2", "collect.min_agreement=0.6"])


def test_the_majority_decides_and_ties_are_left_out(params: Params) -> None:
    export = [
        _task(1, (1, "right"), (2, "right"), (3, "left"), strength="clear"),
        _task(2, (1, "left"), (2, "right")),  # no majority
        _task(3, (1, "tie")),
        _task(4, (1, "both_bad")),
        {"id": 5, "data": {}, "annotations": []},  # not labelled yet
    ]
    pulled = collect.pairs(params, export, PEOPLE, WHERE)
    (pair,) = pulled.pairs
    assert (pair["chosen"], pair["rejected"]) == ("Right 1.", "Left answer 1.")
    assert pair["annotator"] == "a@x.org+b@x.org" and pair["margin"] == 1.0
    assert pair["id"] == "labelstudio-7-1"
    assert '"chosen_model": "p/3"' in pair["source"] and '"rejected_model": "p/2"' in pair["source"]
    counts = pulled.counts
    assert (counts["completed"], counts["no_majority"], counts["tie"], counts["both_bad"]) == (
        4, 1, 1, 1
    )  # fmt: skip
    # c disagreed on task 1; on task 2 nobody agreed with a majority (there was none).
    assert pulled.agreement == {"a@x.org": (1, 2), "b@x.org": (1, 2), "c@x.org": (0, 1)}


def test_an_annotator_below_the_agreement_floor_fails_the_pull_or_is_reported(
    params: Params,
) -> None:
    export = [
        _task(1, (1, "left"), (2, "left"), (3, "right")),
        _task(2, (1, "right"), (2, "right"), (3, "left")),
    ]
    pulled = collect.pairs(params, export, PEOPLE, WHERE)
    with pytest.raises(DataError, match=r"c@x.org: agrees with the majority on 0 of 2 tasks"):
        collect.check_agreement(params, pulled)
    warn = params.model_copy(
        update={"collect": params.collect.model_copy(update={"agreement_check": "warn"})}
    )
    (line,) = collect.check_agreement(warn, pulled)
    assert line.startswith("c@x.org")


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (_task(1, (None, "left")), "task 1: annotation 100 has no annotator"),
        ({"id": 2, "data": {"text": "x"}, "annotations": [{"id": 3, "completed_by": 1,
          "result": [{"from_name": "preference", "value": {"choices": ["left"]}}]}]},
         "task 2: not a task of `rlhf collect`"),
    ],
)  # fmt: skip
def test_tasks_that_stop_a_pull(params: Params, task: dict, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        collect.pairs(params, [task], PEOPLE, WHERE)


# -- what is asked ------------------------------------------------------------------------------
def test_an_answer_the_gate_would_refuse_is_never_asked_about() -> None:
    """A small model's byte-level tokens can produce a control character ("Apples are\\x03nes",
    seen in a round on the demo): labelled, it would fail the whole pull at the gate."""
    params = load_params(ROOT / "params.yaml", ["validate.max_chars=40"])
    assert collect.askable(params, "Apples are sweet and crunchy.")
    for bad in ("Apples are\x03nes crops.", "  ", "Apples \ufffd.", "Apples are sweet. " * 3):
        assert not collect.askable(params, bad), bad


def test_selection_by_how_far_apart_the_reward_model_scores_two_answers() -> None:
    params = load_params(
        ROOT / "params.yaml", ["collect.selection=uncertain", "collect.pairs_per_prompt=2"]
    )
    replies = {"Tell me about dogs.": [("A.", "m/1"), ("B.", "m/1"), ("C.", "m/1"), ("D.", "m/1")]}
    prompt = "Tell me about dogs."
    scores = {(prompt, "A."): 0.0, (prompt, "B."): 0.1, (prompt, "C."): 2.0, (prompt, "D."): 2.15}
    asked = collect.tasks(params, replies, scores)
    pairs = {frozenset((t["data"]["left"], t["data"]["right"])) for t in asked}
    assert pairs == {frozenset(("A.", "B.")), frozenset(("C.", "D."))}
    extremes = load_params(
        ROOT / "params.yaml", ["collect.selection=extremes", "collect.pairs_per_prompt=1"]
    )
    (widest,) = collect.tasks(extremes, replies, scores)
    assert {widest["data"]["left"], widest["data"]["right"]} == {"A.", "D."}
    randomly = collect.tasks(
        load_params(ROOT / "params.yaml", ["collect.pairs_per_prompt=6"]), replies
    )
    assert len(randomly) == 6  # every pair of four answers, when that many are asked for
