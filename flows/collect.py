"""Prefect flows ``rlhf_collect`` and ``rlhf_collect_pull``: asking people, then taking in what
they said (``rlhf_tasks/collect.py``).

- ``rlhf_collect``: the champion's (and challenger's) answers to new prompts of the RL pool, as
  pairwise tasks in the Label Studio project.
- ``rlhf_collect_pull``: the completed annotations as preference pairs, then the ingest flow
  (the gate, ``data/``, ``dvc add``, git commit, ``dvc push``; with ``retrain``, a retraining).
  The ``rlhf-collect`` deployment runs it on a schedule. A pull that finds nothing new completes
  and ingests nothing; one that finds a bad task fails, naming it, and ingests nothing.
- ``rlhf_rounds``: iterated RLHF on the demo, N rounds of collect, the demo's simulated
  annotators, pull and ingest, then the pipeline in-process (``rlhf rounds N``).

The Label Studio server and key come from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` (a
worker's environment), else the local server's credentials (``rlhf annotate serve``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE  # a client as input: nothing to cache on
from prefect.states import State

from flows import logs
from flows.ingest import rlhf_ingest
from rlhf_tasks import collect, environment, labelstudio
from rlhf_tasks import rounds as rounds_table
from rlhf_tasks.config import DEFAULT_PARAMS, load_params
from rlhf_tasks.errors import UserError


def _step(fn: Any, name: str, params_path: str, overrides: list[str] | None) -> tuple[Any, Any]:
    """``fn(params, client)`` as the task ``name``, against the project's Label Studio:
    (its result, None), or (None, the flow's Failed state) after a user's mistake."""
    try:
        params = load_params(params_path, overrides or [])
        with labelstudio.LabelStudio(labelstudio.server()) as client:
            step = task(logs.quiet_failures(fn), name=name, cache_policy=NO_CACHE)
            state = step(params, client, return_state=True)
    except UserError as exc:
        return None, logs.user_failure(exc)
    if state.is_failed():
        return None, logs.user_failure(state.result(raise_on_failure=False))
    return state.result(), None


@flow(name="rlhf_collect")
def rlhf_collect(
    params_path: str = str(DEFAULT_PARAMS), overrides: list[str] | None = None
) -> dict[str, Any] | State:
    environment.set_defaults()
    made, failed = _step(collect.collect, "collect", params_path, overrides)
    if failed:
        return failed
    logs.say(
        f"{made['tasks']} task(s) for {made['prompts']} prompt(s), answers of "
        f"{', '.join(made['models'])}, in Label Studio project {made['project_id']} "
        f"{made['project']!r}: {made['url']}"
    )
    return made


@flow(name="rlhf_collect_pull")
def rlhf_collect_pull(
    params_path: str = str(DEFAULT_PARAMS),
    overrides: list[str] | None = None,
    commit: bool = True,
    push: bool = True,
    retrain: bool = False,
) -> dict[str, Any] | State:
    environment.set_defaults()
    summary, failed = _step(collect.pull, "pull", params_path, overrides)
    if failed:
        return failed
    logs.say(collect.describe_pull(summary))
    if summary["batch"] is None:
        logs.say("nothing new to ingest")
        return summary
    how = {"commit": commit, "push": push, "retrain": retrain}
    state = rlhf_ingest(summary["batch"], params_path, overrides or [], **how, return_state=True)
    if not state.is_completed():
        return logs.passed_on(state)
    return summary | {"ingest": state.result()}


def _label(per_task: int, seed: int) -> Any:
    """The demo's simulated annotators as a step function (``collect.simulate``)."""

    def label(params: Any, client: labelstudio.LabelStudio) -> dict[str, int]:
        return collect.simulate(params, client, per_task, seed)

    return label


@flow(name="rlhf_rounds")
def rlhf_rounds(
    rounds: int = 1,
    params_path: str = str(DEFAULT_PARAMS),
    overrides: list[str] | None = None,
    per_task: int = 3,
    push: bool = True,
) -> list[dict[str, Any]] | State:
    """Iterated RLHF on the demo: each round collects the champion's answers, has the demo's
    simulated annotators label them in Label Studio, pulls and ingests the pairs (committed, a
    new data version), retrains (the pipeline; unchanged stages are skipped) and promotes or
    not. A row per round (``rlhf_tasks/rounds.py``) after each; a failed step ends the flow
    with the rounds before it kept."""
    from flows.pipeline import rlhf_pipeline

    environment.set_defaults()
    done = [rounds_table.row(0)]
    for number in range(1, rounds + 1):
        made = rlhf_collect(params_path, overrides, return_state=True)
        if not made.is_completed():
            return logs.passed_on(made)
        labelled, failed = _step(_label(per_task, number), "label", params_path, overrides)
        if failed:
            return failed
        pulled = rlhf_collect_pull(params_path, overrides, push=push, return_state=True)
        if not pulled.is_completed():
            return logs.passed_on(pulled)
        summary = pulled.result()
        if summary["batch"] is not None:
            trained = rlhf_pipeline(params_path, overrides, return_state=True)
            if not trained.is_completed():
                return logs.passed_on(trained)
        asked = made.result()["tasks"]
        done.append(
            rounds_table.row(
                number,
                tasks=asked,
                annotations=labelled.get("annotations", 0),
                pairs_added=summary["new_pairs"],
                # this round's tasks that became no pair: tie, both bad, no majority (the
                # pull's own counts are of every completed task of the project)
                left_out=max(asked - summary["new_pairs"], 0),
            )
        )
        path = rounds_table.write(done)
        logs.say(f"round {number} of {rounds} (table in {path}):\n{rounds_table.table(done)}")
    return done
