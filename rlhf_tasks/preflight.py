"""Checks that run before any stage does: a mistake in the params is found in seconds, with one
message naming its key, not after the stages before the one that reads it have run for minutes.

``load_params`` already refuses unknown keys, wrong types and impossible values of this
project's own sections, and data paths that lead out of the project. ``check`` adds what needs
more than the params file:

- each training stage's TRL arguments (``sft.args``, ``reward.args`` and the chosen policy
  algorithm's ``args``), built into their TRL config classes as the stages build them
  (``training.trainer_config``): unknown keys, wrong types, values out of range;
- each model the run starts from (``model.name_or_path``; ``reward.init_from`` and
  ``evaluate.judge`` when they name a model): a local directory must exist and hold a model;
  a hub id must be in the local Hugging Face cache when the hub is offline (``HF_HUB_OFFLINE``);
  a model that ships its own code is refused unless ``model.trust_remote_code``, and one whose
  weights are only pickles (``pytorch_model.bin``, ``*.pt``) unless ``model.allow_pickle``;
- the model's tokenizer has a chat template (a local model directory; every stage renders the
  data as chat messages with it);
- the evaluation's judge: ``gold`` only on the demo's prompts (it knows no others; the first
  ``JUDGE_SAMPLE`` held-out prompts are read); ``heldout_rm`` only with a ``judge.fraction``
  to train it on; never the reward model the policy is trained against (a policy that games it
  would win).

Cheap: it reads file names and ``config.json``, never weights, and TRL arguments found valid
are not built again until they, this code or the libraries change (``CHECKED_ARGS``), so an
`rlhf run` whose stages are all cached does not import TRL for them. ``rlhf run`` and the
Prefect flow ``rlhf_pipeline`` call it before their first stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rlhf_tasks.config import HELDOUT_RM, Params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.models import check_model_location
from rlhf_tasks.stages import STAGES

# The TRL config class of each params section that configures one of TRL's trainers.
TRL_CONFIGS = {
    "sft": "SFTConfig",
    "reward": "RewardConfig",
    "rloo": "RLOOConfig",
    "grpo": "GRPOConfig",
    "dpo": "DPOConfig",
}

# TRL arguments that were found valid: the digest of what their check depends on. Building TRL's
# config classes means importing torch, transformers, peft and TRL (seconds, and more than an
# `rlhf run` whose stages are all cached needs otherwise), so arguments checked once are not
# checked again until they, this code or those libraries change. The stages check them anyway.
CHECKED_ARGS = Path("artifacts/cache/preflight.json")
# Held-out prompts read to tell whether the data is the demo's (for evaluate.judge: gold).
JUDGE_SAMPLE = 200


def check(params: Params) -> None:
    """Raise one ConfigError listing every problem found (see the module docstring)."""
    problems: list[str] = []
    digest = _args_digest(params)
    if not _checked_before(digest):
        try:
            trainer_configs(params)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            _remember(digest)
    for step in (_check_models, _check_judge):
        try:
            step(params)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def _args_digest(params: Params) -> str:
    from importlib.metadata import version

    sections = ["model", "sft", "reward", params.policy.algorithm]
    dump = params.model_dump(mode="json", by_alias=True)
    h = hashlib.sha256(json.dumps({s: dump[s] for s in sections}, sort_keys=True).encode())
    h.update(" ".join(version(pkg) for pkg in ("trl", "transformers", "torch")).encode())
    for module in ("preflight.py", "training.py"):
        h.update((Path(__file__).parent / module).read_bytes())
    return h.hexdigest()


def _checked_before(digest: str) -> bool:
    try:
        return json.loads(CHECKED_ARGS.read_text()).get("args") == digest
    except (OSError, ValueError, AttributeError):
        return False


def _remember(digest: str) -> None:
    with contextlib.suppress(OSError):  # a read-only project: checked again next time
        CHECKED_ARGS.parent.mkdir(parents=True, exist_ok=True)
        tmp = CHECKED_ARGS.with_name(f".{CHECKED_ARGS.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"args": digest}) + "\n")
        tmp.replace(CHECKED_ARGS)


# -- TRL's arguments ----------------------------------------------------------------------------


def trainer_configs(params: Params) -> dict[str, Any]:
    """The TRL config of each training stage of this run, built as the stages build them:
    ``{"sft": SFTConfig, "reward": RewardConfig, "<algorithm>": ...}`` (PPO's section is this
    project's own, checked by ``load_params``). A ConfigError names the bad key of each section."""
    import trl

    from rlhf_tasks.training import trainer_config

    configs, problems, seen = {}, [], set()
    for stage in STAGES.values():
        if stage.trainer_section is None:
            continue
        section = stage.trainer_section(params)
        if section in seen:
            continue  # the judge trains with the reward stage's args: checked once
        seen.add(section)
        cls = getattr(trl, TRL_CONFIGS[section]) if section in TRL_CONFIGS else None
        if cls is None:
            continue  # our own trainer (ppo): its section is checked by load_params
        cfg = getattr(params, section)
        try:
            configs[section] = trainer_config(
                cls,
                section,
                cfg.args,
                output_dir=stage.io().checkpoints,
                seed=cfg.seed,
                model=params.model,
            )
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return configs


# -- the models a run starts from ------------------------------------------------------------


def _check_models(params: Params) -> None:
    locations = []
    name = params.model.name_or_path
    # The default, artifacts/base_model, is built by the base_model stage (the demo model).
    if Path(name).resolve() != Path(STAGES["base_model"].outputs["model"].path).resolve():
        locations.append(("model.name_or_path", name))
    if params.reward.init_from not in ("sft", "base"):
        locations.append(("reward.init_from", params.reward.init_from))
    if params.evaluate.judge not in ("gold", HELDOUT_RM):
        locations.append(("evaluate.judge", params.evaluate.judge))
    problems = []
    for key, location in locations:
        try:
            check_model_location(location, key, params.model)
            if key == "model.name_or_path":
                check_chat_template(Path(location), key)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer in the model directory ``path`` has a chat template (in its
    tokenizer_config.json, or as chat_template.jinja / .json beside it)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def check_chat_template(path: Path, key: str) -> None:
    """Every stage renders prompts and responses as chat messages with the model's chat template:
    a local model whose tokenizer has none (a base GPT-2, say) is refused before anything runs."""
    if path.is_dir() and not has_chat_template(path):
        raise no_chat_template(str(path), key)


def no_chat_template(location: str, key: str) -> ConfigError:
    return ConfigError(
        f"{key}={location!r}: its tokenizer has no chat template, and every stage renders "
        "prompts and responses as chat messages with it (the data's turns, the answer, the end "
        "of the turn the reward is read at). Start from the model's chat or instruct variant, "
        "or give the tokenizer a template and save it beside the model: `tok = AutoTokenizer."
        "from_pretrained(DIR); tok.chat_template = TEMPLATE; tok.save_pretrained(DIR)` (README: "
        "Your data and your model)"
    )


def _check_judge(params: Params) -> None:
    judge = params.evaluate.judge
    if judge == "gold":
        from rlhf_tasks import data, demo

        path = params.data.prompts_heldout
        if not Path(path).exists():
            return  # `rlhf data demo` writes it; the validate stage reports a missing file
        first = next(
            data.iter_chunks([path], "prompts", JUDGE_SAMPLE, reading=params.data.reading())
        )
        prompts = [p for p in first.frame["prompt"] if isinstance(p, str)]
        unknown = sum(demo.topic_of(p) is None for p in prompts)
        if prompts and unknown > 0.1 * len(prompts):
            raise ConfigError(
                f"evaluate.judge=gold is the demo task's judge, but {unknown} of the first "
                f"{len(prompts)} prompts of data.prompts_heldout ({path}) are not demo prompts: "
                f"set evaluate.judge={HELDOUT_RM} with judge.fraction (e.g. 0.2) to judge with a "
                "reward model trained on pairs the policy's reward model never sees, or to the "
                "path of an external reward model"
            )
        return
    if judge == HELDOUT_RM:
        if not params.judge.fraction:
            raise ConfigError(
                f"evaluate.judge={HELDOUT_RM} judges with the judge stage's reward model, which "
                "trains on judge.fraction of the training prompts' pairs, but judge.fraction is "
                "0: set it (e.g. judge.fraction=0.2)"
            )
        return
    trained = Path(STAGES["reward"].outputs["model"].path).resolve()
    if params.policy.algorithm != "dpo" and Path(judge).resolve() == trained:
        raise ConfigError(
            f"evaluate.judge={judge!r} is the reward model the policy is trained against: a "
            "policy that games it would win. Judge with a reward model trained on other pairs, "
            "or an external one"
        )
