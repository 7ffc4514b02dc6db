"""Reading the model registry: ``rlhf models``, ``rlhf lineage`` and ``rlhf generate``.

Changes to the registry (register, promote, rollback) live in ``rlhf_tasks/promote.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rlhf_tasks import evaluate, promote
from rlhf_tasks.config import ALGORITHMS, Params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.tracking import logged_models, store


def resolve(client: Any, ref: str) -> Any:
    """The model version of ``NAME@alias`` or ``NAME/version``; ConfigError if there is none."""
    from mlflow.exceptions import MlflowException

    name, at, alias = ref.partition("@")
    if at:
        version = promote.alias_version(client, name, alias)
        if version is None:
            raise ConfigError(f"{ref}: {name} has no version with alias {alias!r}")
        return version
    name, slash, number = ref.rpartition("/")
    if not slash or not number.isdigit():
        raise ConfigError(
            f"{ref}: expected NAME@alias or NAME/version, e.g. rlhf-demo-policy@champion"
        )
    try:
        return client.get_model_version(name, number)
    except MlflowException:
        raise ConfigError(f"{ref}: no such model version (see `rlhf models`)") from None


def models_table(params: Params) -> str:
    """Every version of the policy and reward models: aliases, decision, key metrics."""
    client = promote._client()
    lines = []
    for role, name in promote.model_names(params).items():
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            lines.append(f"{name}: no versions yet (run the pipeline: `rlhf run`)")
            continue
        aliases: dict[str, list[str]] = {}
        for alias, number in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(number), []).append(alias)
        lines.append(f"{name}:")
        header = f"  {'version':>7}  {'aliases':<20} {'created (UTC)':<17} "
        header += "decision    win rate  KL     RM acc" if role == "policy" else "RM acc  policy"
        lines.append(header)
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            created = dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC)
            held = ",".join(sorted(aliases.get(str(mv.version), []))) or "-"
            row = f"  {mv.version:>7}  {held:<20} {created:%Y-%m-%d %H:%M} "
            tags = mv.tags
            if role == "policy":
                row += (
                    f"{tags.get('rlhf.promotion', '-'):<11} "
                    f"{tags.get('rlhf.win_rate_vs_baseline', '-'):<9} "
                    f"{tags.get('policy/kl_to_sft', '-'):<6} "
                    f"{tags.get('reward_model/accuracy', '-')}"
                )
                if "rlhf.rejected_reasons" in tags:
                    row += f"\n           why: {tags['rlhf.rejected_reasons']}"
            else:
                row += f"{tags.get('reward_model/accuracy', '-'):<7} "
                row += f"v{tags.get('rlhf.policy_version', '-')}"
            lines.append(row)
    return "\n".join(lines)


def lineage(ref: str) -> str:
    """Where a model version came from: data, code, params, and the runs that made it."""
    client = promote._client()
    mv = resolve(client, ref)
    tags = mv.tags
    lines = [
        f"{mv.name} version {mv.version}"
        + (f" (aliases: {', '.join(mv.aliases)})" if mv.aliases else ""),
        f"  decision:       {tags.get('rlhf.promotion', 'pending')}"
        + (f" ({tags['rlhf.rejected_reasons']})" if "rlhf.rejected_reasons" in tags else ""),
        f"  data md5:       {tags.get('rlhf.data_md5', '?')}   (DVC; compare with data.dvc)",
        f"  DVC remote:     {tags.get('rlhf.dvc_remote', '?')}",
        f"  git commit:     {tags.get('rlhf.git_commit', '?')}"
        + ("   (working tree was dirty)" if tags.get("rlhf.git_dirty") == "true" else ""),
        f"  params hash:    {tags.get('rlhf.params_hash', '?')}",
        f"  validation:     {tags.get('rlhf.validation', '?')}",
        f"  model source:   {mv.source} (run {mv.run_id})",
        "  runs:",
    ]
    for key in sorted(k for k in tags if k.startswith("rlhf.run.")):
        run = client.get_run(tags[key])
        lines.append(f"    {key.removeprefix('rlhf.run.'):<9} {run.info.run_id}  {run.info.status}")
    source_run = client.get_run(mv.run_id)
    lines.append(f"  params of the run that trained it ({source_run.info.run_name}):")
    logged = source_run.data.params
    # The policy stage logs every algorithm's section: only the one that trained it is its own.
    others = set(ALGORITHMS) - {logged.get("policy.algorithm")}
    lines += [
        f"    {k} = {v}"
        for k, v in sorted(logged.items())
        if "." in k and k.partition(".")[0] not in others
    ]
    return "\n".join(lines)


def generate(params: Params, prompt: str, ref: str | None = None) -> str:
    """One response from a registered policy (default: ``<prefix>-policy@champion``)."""
    import mlflow

    client = promote._client()
    mv = resolve(client, ref or f"{promote.model_names(params)['policy']}@{promote.CHAMPION}")
    mlflow.set_tracking_uri(store.tracking_uri())
    components = logged_models.load_logged_model(f"models:/{mv.name}/{mv.version}", params.model)
    (text,) = evaluate.generate(
        components["model"].eval(), components["tokenizer"], [prompt], params.evaluate
    )
    return text
