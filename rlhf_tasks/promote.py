"""Stage ``promote``: register the models of this run, then the champion/challenger gate.

    rlhf stage promote            (the pipeline's last stage)
    rlhf promote --version N      (by hand; recorded like the gate's decisions)
    rlhf rollback                 (the champion alias goes back to the previous champion)

1. **Register.** The policy and the reward model that the ``policy`` and ``reward`` stages
   logged to their MLflow runs become new versions of ``<prefix>-policy`` and
   ``<prefix>-reward`` (``tracking.model_prefix``). Each version is tagged with its lineage (data
   md5, git commit, params hash, the stage runs), the validation status and the key evaluation
   metrics; the new policy version gets the alias ``challenger``.
2. **Gate.** The challenger is compared with the ``champion`` on the held-out prompts with the
   evaluation's judge: both generate on the same prompts with the same random stream (the first
   model is compared with the SFT model instead, from the ``evaluate`` stage). It becomes
   champion only if it passes every threshold of the ``promote`` section: win rate, the reward
   model's accuracy floor, and evaluate's checks (KL budget, no degeneration). Otherwise it is
   tagged ``rlhf.promotion=rejected`` with the reasons, and the champion stays as it was.

Registration and decision are all or nothing: if anything fails after the versions were
created, they are deleted again, so a failed run leaves the registry as it found it. A promote
that could not clean up after itself (killed, or cut off from the tracking server half way)
leaves versions without a decision; the next promote of the same models removes them first
(``remove_unfinished``). The reward-model version follows its policy version: they carry the
same aliases.

Every champion change appends to the tag ``rlhf.champion_history`` of the registered policy
model (version numbers, oldest first); ``rollback`` walks it back.
"""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Any

from rlhf_tasks import evaluate
from rlhf_tasks.config import Params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.locations import StageIO
from rlhf_tasks.models import load_tokenizer, model_kwargs
from rlhf_tasks.stages import STAGES
from rlhf_tasks.tracking import lineage, logged_models, progress, runs, store
from rlhf_tasks.training import write_json

CHAMPION, CHALLENGER = "champion", "challenger"
DECISION_TAG = "rlhf.promotion"  # set on a policy version once the gate decided on it
PREVIOUS_CHALLENGER_TAG = "rlhf.previous_challenger"
HISTORY_TAG = "rlhf.champion_history"
# Evaluation metrics copied onto the policy version as tags (when the evaluation has them).
VERSION_METRICS = [
    "judge/win_rate_vs_sft",
    "gold/win_rate_vs_sft",
    "policy/kl_to_sft",
    "policy/reward_mean",
    "gold/policy_score",
    "reward_model/accuracy",
    "checks/kl_within_budget",
    "checks/no_degeneration",
]


def model_names(params: Params) -> dict[str, str]:
    prefix = params.tracking.model_prefix
    return {"policy": f"{prefix}-policy", "reward": f"{prefix}-reward"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read(path: Path, stage: str) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"stage promote needs {path}; run the {stage} stage first")
    return json.loads(path.read_text())


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store.tracking_uri())


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The model version that holds ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _model_uri(client: Any, stage: str, params: Params, model_dir: Path) -> str:
    """The stage's logged model; logged now (to the active run) if the stage's run is not in
    this store, e.g. after MLFLOW_TRACKING_URI changed between stages."""
    from mlflow.exceptions import MlflowException

    record = runs.recorded_run(stage) or {}
    if record.get("model_id"):
        try:
            client.get_logged_model(record["model_id"])
            return f"models:/{record['model_id']}"
        except MlflowException:
            pass
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"stage promote needs the {stage} model in {model_dir}")
    return f"models:/{logged_models.log_model(STAGES[stage], model_dir, params)}"


def register(
    params: Params, client: Any, evaluation: dict[str, Any], io: StageIO
) -> dict[str, Any]:
    """New versions of the models the registry's stages register (the policy and the reward
    model), tagged; the policy's gets ``challenger``."""
    import mlflow

    names = model_names(params)
    report = _read(io.inputs["validation"], "validate")
    tags = {
        key: value
        for key, value in lineage.lineage(params, runs.validated_version(params)).items()
        if key.startswith("rlhf.")  # mlflow.* tags belong to runs
    }
    tags["rlhf.validation"] = "passed" if report.get("valid") else "failed"
    for stage in STAGES:
        record = runs.recorded_run(stage) if stage != "promote" else None
        if record:
            tags[f"rlhf.run.{stage}"] = record["run_id"]
    if progress.active():
        tags["rlhf.run.promote"] = mlflow.active_run().info.run_id
    algorithm = params.policy.algorithm
    versions: dict[str, Any] = {}
    before = alias_version(client, names["policy"], CHALLENGER)
    try:
        for role in (stage.name for stage in STAGES.values() if stage.registers):
            role_tags = dict(tags)
            if role == "policy":
                role_tags["rlhf.algorithm"] = algorithm
                if before is not None:  # where challenger goes back to if this is undone
                    role_tags[PREVIOUS_CHALLENGER_TAG] = str(before.version)
                role_tags.update(
                    {k: f"{evaluation[k]:.4f}" for k in VERSION_METRICS if k in evaluation}
                )
            else:
                role_tags["reward_model/accuracy"] = f"{evaluation['reward_model/accuracy']:.4f}"
            versions[role] = mlflow.register_model(
                _model_uri(client, role, params, io.inputs[f"{role}_model"]),
                names[role],
                tags=role_tags,
            )
        client.set_model_version_tag(
            names["policy"],
            versions["policy"].version,
            "rlhf.reward_version",
            versions["reward"].version,
        )
        client.set_model_version_tag(
            names["reward"],
            versions["reward"].version,
            "rlhf.policy_version",
            versions["policy"].version,
        )
        _set_alias(client, params, CHALLENGER, versions["policy"].version)
    except BaseException:
        unregister(client, params, versions, before)
        raise
    versions["previous_challenger"] = before
    return versions


def unregister(
    client: Any, params: Params, versions: dict[str, Any], challenger: Any | None
) -> None:
    """Delete the versions this run created (their aliases go with them) and give
    ``challenger`` back to the version that held it before."""
    names = model_names(params)
    for role in ("policy", "reward"):
        if role in versions:
            client.delete_model_version(names[role], versions[role].version)
    if challenger is not None:
        _set_alias(client, params, CHALLENGER, challenger.version)


def _set_alias(client: Any, params: Params, alias: str, policy_version: str | int) -> None:
    """Give ``alias`` to a policy version and to the reward-model version it was trained with."""
    names = model_names(params)
    client.set_registered_model_alias(names["policy"], alias, str(policy_version))
    mv = client.get_model_version(names["policy"], str(policy_version))
    reward_version = mv.tags.get("rlhf.reward_version")
    if reward_version:
        client.set_registered_model_alias(names["reward"], alias, reward_version)


def champion_history(client: Any, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


def make_champion(client: Any, params: Params, version: str | int) -> None:
    """Move ``champion`` to a policy version (and its reward model); append to the history."""
    name = model_names(params)["policy"]
    _set_alias(client, params, CHAMPION, version)
    history = [*champion_history(client, name), str(version)]
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))


def gate(
    params: Params, client: Any, version: Any, evaluation: dict[str, Any], io: StageIO
) -> dict[str, Any]:
    """The decision for a challenger: {"promoted", "baseline", "win_rate", "reasons"}."""
    cfg = params.promote
    name = model_names(params)["policy"]
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        baseline, win = "sft", evaluation["judge/win_rate_vs_sft"]
    else:
        baseline = f"{name} version {champion.version} (champion)"
        win = _win_rate_vs_champion(params, name, champion.version, io)
    reasons = []
    if win < cfg.min_win_rate:
        reasons.append(
            f"judge's win rate vs {baseline} is {win:.3f}, below promote.min_win_rate "
            f"{cfg.min_win_rate}"
        )
    accuracy = evaluation["reward_model/accuracy"]
    if accuracy < cfg.min_reward_model_accuracy:
        reasons.append(
            f"reward-model held-out accuracy {accuracy:.3f} is below "
            f"promote.min_reward_model_accuracy {cfg.min_reward_model_accuracy}"
        )
    for check in cfg.required_checks:
        if evaluation.get(f"checks/{check}") != 1:
            detail = (
                f"KL to SFT {evaluation['policy/kl_to_sft']:.2f} nats > evaluate.kl_budget "
                f"{params.evaluate.kl_budget}"
                if check == "kl_within_budget"
                else "length or distinct-2 moved more than 20% from SFT's, and the judge does "
                "not prefer it"
            )
            reasons.append(f"check {check} failed: {detail}")
    return {
        "version": int(version.version),
        "promoted": not reasons,
        "baseline": baseline,
        "win_rate": round(float(win), 6),
        "reasons": reasons,
    }


def _win_rate_vs_champion(params: Params, name: str, champion_version: str, io: StageIO) -> float:
    """The challenger (this run's policy) against the champion, on the held-out prompts."""
    from transformers import AutoModelForCausalLM

    load = model_kwargs(params.model)
    challenger_dir = io.inputs["policy_model"]
    champion = logged_models.load_logged_model(f"models:/{name}/{champion_version}", params.model)
    models = {
        "challenger": (
            AutoModelForCausalLM.from_pretrained(challenger_dir, **load),
            load_tokenizer(str(challenger_dir), load["trust_remote_code"], "policy"),
        ),
        "champion": (champion["model"], champion["tokenizer"]),
    }
    prompts = io.inputs["prompts_heldout"]
    judge_model = io.inputs["judge_model"]
    return evaluate.compare(params.evaluate, models, prompts, params.model, judge_model)["win_rate"]


def _record(client: Any, params: Params, decision: dict[str, Any]) -> None:
    names = model_names(params)
    version = str(decision["version"])
    tags = {
        "rlhf.promotion": CHAMPION if decision["promoted"] else "rejected",
        "rlhf.decided_at": _now(),
        "rlhf.baseline": decision["baseline"],
        "rlhf.win_rate_vs_baseline": f"{decision['win_rate']:.4f}",
    }
    if decision["reasons"]:
        tags["rlhf.rejected_reasons"] = "; ".join(decision["reasons"])
    for key, value in tags.items():
        client.set_model_version_tag(names["policy"], version, key, value)
    if decision["promoted"]:
        make_champion(client, params, version)


# What a registered model is and how to call it: its description in the registry.
MODEL_DESCRIPTIONS = {
    "policy": (
        "The RLHF pipeline's policy: a chat model (MLflow pyfunc). Send OpenAI-style chat "
        'requests, `{{"messages": [{{"role": "user", "content": "..."}}]}}`, optionally with '
        "`temperature`, `max_tokens`, `top_p` and `seed` (defaults: the evaluation's); it answers "
        "with a `chat.completion`. Serve `models:/{name}@champion` with `mlflow models serve "
        "--env-manager local`, or load it with `mlflow.pyfunc.load_model`. Each version's "
        "description says why it is or is not champion; `rlhf lineage {name}/VERSION` says "
        "what made it."
    ),
    "reward": (
        "The RLHF pipeline's reward model (MLflow pyfunc): send `prompt` and `response` "
        "columns, or `messages` ending with the assistant reply; it returns one score each, the "
        "score the policy stage optimised (PPO, RLOO, GRPO; DPO trains on the pairs instead). "
        "The version with alias `champion` is the one registered with the champion policy "
        "(tag `rlhf.policy_version`)."
    ),
}


def describe(
    client: Any, params: Params, decision: dict[str, Any], evaluation: dict[str, Any], io: StageIO
) -> None:
    """Descriptions a reviewer reads in MLflow's UI without the CLI: the policy version's says
    the decision and its reasons, the win rate and against what, the reward model's accuracy,
    KL, data and commit, and a few of its answers; the registered models' say what they are
    and how to call them."""
    names = model_names(params)
    version = str(decision["version"])
    tags = client.get_model_version(names["policy"], version).tags
    verdict = "**Champion**" if decision["promoted"] else "**Rejected**"
    lines = [
        f"{verdict}: win rate {decision['win_rate']:.3f} against {decision['baseline']} "
        f"(judge: {params.evaluate.judge}; at least {params.promote.min_win_rate} needed).",
        *(f"- {reason}" for reason in decision["reasons"]),
        "",
        "| measure | value |",
        "|---|---|",
        *(
            f"| {key} | {evaluation[key]:.4f} |"
            for key in VERSION_METRICS
            if isinstance(evaluation.get(key), int | float)
        ),
        f"| data md5 | {tags.get('rlhf.data_md5', '?')} |",
        f"| git commit | {tags.get('rlhf.git_commit', '?')} |",
        f"| algorithm | {tags.get('rlhf.algorithm', '?')} |",
        f"| reward model | {names['reward']} version {tags.get('rlhf.reward_version', '?')} |",
    ]
    samples = _samples(io.inputs["generations"])
    if samples:
        lines += ["", "Sample answers (held-out prompts, policy against SFT):", ""]
        for row in samples:
            lines += [
                f"- **{row['prompt']}**",
                f"  - policy: {row['policy']}",
                f"  - sft: {row['sft']}",
            ]
    client.update_model_version(names["policy"], version, description="\n".join(lines))
    reward_version = tags.get("rlhf.reward_version")
    if reward_version:
        client.update_model_version(
            names["reward"],
            reward_version,
            description=(
                f"Held-out accuracy {evaluation.get('reward_model/accuracy', float('nan')):.4f}; "
                f"trained with data {tags.get('rlhf.data_md5', '?')}; the reward model of "
                f"{names['policy']} version {version}."
            ),
        )
    for role, name in names.items():
        client.update_registered_model(name, description=MODEL_DESCRIPTIONS[role].format(name=name))


SAMPLE_ANSWERS = 3


def _samples(path: Path) -> list[dict[str, Any]]:
    """The first answers of the evaluation's generations (one per prompt), if it wrote any."""
    rows: list[dict[str, Any]] = []
    if Path(path).is_file():
        with Path(path).open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if row["prompt"] not in {r["prompt"] for r in rows}:
                    rows.append(row)
                if len(rows) == SAMPLE_ANSWERS:
                    break
    return rows


def run(params: Params, io: StageIO) -> dict[str, Any]:
    """The ``promote`` stage: register, gate, record; return the decision and its metrics. The
    decision is written to ``decision.json`` in its workdir."""
    out_dir = io.workdir
    evaluation = _read(io.inputs["evaluation"], "evaluate")
    client = _client()
    remove_unfinished(params, client)
    existing = _already_registered(params, client)
    if existing is not None:
        return _unchanged(params, client, existing, out_dir)
    versions = register(params, client, evaluation, io)
    try:
        decision = gate(params, client, versions["policy"], evaluation, io)
        describe(client, params, decision, evaluation, io)  # before the aliases move
        _record(client, params, decision)
    except BaseException:
        unregister(client, params, versions, versions["previous_challenger"])
        raise
    decision["model"] = model_names(params)["policy"]
    decision["new_version"] = True
    decision["reward_version"] = int(versions["reward"].version)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "decision.json", decision)
    verdict = "champion" if decision["promoted"] else "rejected"
    print(
        f"{decision['model']} version {decision['version']}: {verdict} (win rate "
        f"{decision['win_rate']:.3f} vs {decision['baseline']})"
        + "".join(f"\n  - {r}" for r in decision["reasons"])
    )
    return {
        "outputs": {"decision": str(out_dir / "decision.json")},
        "metrics": {
            "promote/promoted": float(decision["promoted"]),
            "promote/win_rate_vs_baseline": decision["win_rate"],
            "promote/policy_version": float(decision["version"]),
            "promote/new_version": 1.0,
        },
    }


def _already_registered(params: Params, client: Any) -> Any | None:
    """The policy version already registered and decided on from the policy stage's current
    run, if any: a pipeline run whose policy stage was cached made no new model, so there is
    nothing to add."""
    record = runs.recorded_run("policy") or {}
    if not record.get("run_id"):
        return None
    name = model_names(params)["policy"]
    found = client.search_model_versions(f"name = '{name}' and run_id = '{record['run_id']}'")
    found = [mv for mv in found if DECISION_TAG in mv.tags]
    return max(found, key=lambda mv: int(mv.version)) if found else None


def remove_unfinished(params: Params, client: Any) -> None:
    """Remove the versions of this run's models that an earlier promote registered but never
    decided on: it was killed, or lost the tracking server, half way, and so could not remove
    them itself. A policy version is finished once it has its decision (``rlhf.promotion``), a
    reward-model version once it names its (finished) policy version; ``challenger`` goes back
    to the version that held it before. The next promote then registers them afresh."""
    names = model_names(params)
    removed: set[str] = set()
    for role in ("policy", "reward"):
        run_id = (runs.recorded_run(role) or {}).get("run_id")
        if not run_id:
            continue
        for mv in client.search_model_versions(f"name = '{names[role]}' and run_id = '{run_id}'"):
            tags, version = mv.tags, str(mv.version)
            if role == "policy" and DECISION_TAG in tags:
                continue
            if role == "reward" and tags.get("rlhf.policy_version") not in (None, *removed):
                continue
            challenger = alias_version(client, names[role], CHALLENGER)
            restore = (
                role == "policy"
                and challenger is not None
                and str(challenger.version) == version
                and tags.get(PREVIOUS_CHALLENGER_TAG)
            )
            client.delete_model_version(names[role], version)
            if role == "policy":
                removed.add(version)
            print(f"{names[role]} version {version}: left undecided by an earlier promote; removed")
            if restore and _exists(client, names[role], restore):
                _set_alias(client, params, CHALLENGER, restore)


def _exists(client: Any, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException:
        return False
    return True


def _unchanged(params: Params, client: Any, version: Any, out_dir: Path) -> dict[str, Any]:
    name = model_names(params)["policy"]
    champion = alias_version(client, name, CHAMPION)
    is_champion = champion is not None and str(champion.version) == str(version.version)
    decision = {
        "model": name,
        "version": int(version.version),
        "new_version": False,
        "promoted": is_champion,
        "baseline": version.tags.get("rlhf.baseline", "?"),
        "win_rate": float(version.tags.get("rlhf.win_rate_vs_baseline", "nan")),
        "reasons": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "decision.json", decision)
    role = (
        "the champion"
        if is_champion
        else f"not the champion ({version.tags.get('rlhf.promotion', '?')})"
    )
    print(
        f"{name} version {version.version} is already this run's policy (its stages were "
        f"cached): nothing new to register; it is {role}"
    )
    return {
        "outputs": {"decision": str(out_dir / "decision.json")},
        "metrics": {"promote/promoted": float(is_champion), "promote/new_version": 0.0},
    }


# -- by hand: rlhf promote / rollback -----------------------------------------------------------


def promote_version(params: Params, version: int) -> str:
    """Make policy version ``version`` the champion by hand; return what changed."""
    from mlflow.exceptions import MlflowException

    client = _client()
    name = model_names(params)["policy"]
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise ConfigError(f"{name} has no version {version} (see `rlhf models`)") from None
    before = alias_version(client, name, CHAMPION)
    if before is not None and str(before.version) == str(version):
        return f"{name} version {version} is already the champion; nothing changed"
    make_champion(client, params, version)
    for key, value in {
        "rlhf.promotion": "champion (manual)",
        "rlhf.decided_at": _now(),
        "rlhf.promoted_by": getpass.getuser(),
    }.items():
        client.set_model_version_tag(name, str(version), key, value)
    was = f"version {before.version}" if before else "no champion"
    return f"{name}: champion is now version {version} (was {was}); promoted by hand"


def rollback(params: Params) -> tuple[bool, str]:
    """Move ``champion`` back to the previous champion: (changed, message)."""
    client = _client()
    name = model_names(params)["policy"]
    current = alias_version(client, name, CHAMPION)
    if current is None:
        return False, f"nothing to roll back: {name} has no champion"
    history = champion_history(client, name)
    while history and history[-1] == str(current.version):
        history.pop()
    if not history:
        return False, (
            f"nothing to roll back to: version {current.version} is the only champion "
            f"{name} has had"
        )
    previous = history[-1]
    _set_alias(client, params, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    for key, value in {"rlhf.promotion": "rolled back", "rlhf.decided_at": _now()}.items():
        client.set_model_version_tag(name, str(current.version), key, value)
    return True, f"{name}: champion is now version {previous} (rolled back from {current.version})"
