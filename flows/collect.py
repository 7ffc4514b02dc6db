"""Prefect flows ``rlhf_collect`` and ``rlhf_collect_pull``: asking people, then taking in what
they said (``rlhf_tasks/collect.py``).

- ``rlhf_collect``: the champion's (and challenger's) answers to new prompts of the RL pool, as
  pairwise tasks in the Label Studio project.
- ``rlhf_collect_pull``: the completed annotations as preference pairs, then the ingest flow
  (the gate, ``data/``, ``dvc add``, git commit, ``dvc push``; with ``retrain``, a retraining).
  The ``rlhf-collect`` deployment runs it on a schedule. A pull that finds nothing new completes
  and ingests nothing; one that finds a bad task fails, naming it, and ingests nothing.

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
        return state
    return summary | {"ingest": state.result()}
