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
  weights are only pickles (``pytorch_model.bin``, ``*.pt``) unless ``model.allow_pickle``.

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
import re
from pathlib import Path
from typing import Any

from rlhf_tasks.config import ModelConfig, Params
from rlhf_tasks.errors import ConfigError

# Weight files that are pickles: loading one runs whatever code it was made to run.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Files a checkpoint directory holds besides weights; pickles too, but never loaded as a model.
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
# What the hub accepts as a repo id: "name" or "org/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# TRL arguments that were found valid: the digest of what their check depends on. Building TRL's
# config classes means importing torch, transformers, peft and TRL (seconds, and more than an
# `rlhf run` whose stages are all cached needs otherwise), so arguments checked once are not
# checked again until they, this code or those libraries change. The stages check them anyway.
CHECKED_ARGS = Path("artifacts/cache/preflight.json")


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
    try:
        _check_models(params)
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

    from rlhf_tasks import policy, reward, sft
    from rlhf_tasks.training import trainer_config

    sections = {
        "sft": (trl.SFTConfig, sft.DEFAULT_OUT),
        "reward": (trl.RewardConfig, reward.DEFAULT_OUT),
    }
    algorithm = params.policy.algorithm
    if algorithm != "ppo":
        name = {"rloo": "RLOO", "grpo": "GRPO", "dpo": "DPO"}[algorithm]
        sections[algorithm] = (getattr(trl, f"{name}Config"), policy.DEFAULT_OUT)
    configs, problems = {}, []
    for section, (cls, out_dir) in sections.items():
        cfg = getattr(params, section)
        try:
            configs[section] = trainer_config(
                cls,
                section,
                cfg.args,
                output_dir=out_dir / "checkpoints",
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
    from rlhf_tasks import base_model

    locations = []
    name = params.model.name_or_path
    # The default, artifacts/base_model, is built by the base_model stage (the demo model).
    if Path(name).resolve() != base_model.DEFAULT_OUT.resolve():
        locations.append(("model.name_or_path", name))
    if params.reward.init_from not in ("sft", "base"):
        locations.append(("reward.init_from", params.reward.init_from))
    if params.evaluate.judge != "gold":
        locations.append(("evaluate.judge", params.evaluate.judge))
    problems = []
    for key, location in locations:
        try:
            check_model_location(location, key, params.model)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def check_model_location(location: str, key: str, model: ModelConfig) -> None:
    """``location`` (a directory or a hub id, the value of ``key``) holds a model that may be
    loaded under ``model``'s rules; a ConfigError that says why not, otherwise."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(location)  # as the loaders read it: no ~ expansion
    if path.is_dir():
        check_model_dir(path, f"{key}={location!r}", model)
        return
    if path.exists():
        raise ConfigError(f"{key}={location!r}: not a directory; expected a model directory")
    if not _HUB_ID.match(location):
        raise ConfigError(f"{key}={location!r}: no such directory")
    offline = constants.is_offline_mode()
    cached = try_to_load_from_cache(location, "config.json")
    if isinstance(cached, str):  # a hub model already downloaded: check what is there
        # Online, weights that are not in the cache yet are downloaded when the stage loads them.
        where = f"{key}={location!r} (in the HF cache)"
        check_model_dir(Path(cached).parent, where, model, weights=offline)
    elif offline:
        raise ConfigError(
            f"{key}={location!r}: no such directory, and no hub model of that id in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) while the hub is offline "
            "(HF_HUB_OFFLINE=1); download it first, or give the path of a local model directory"
        )
    # Online and not cached: it is downloaded when the stage loads it, and transformers refuses
    # remote code and pickled weights then (training.model_kwargs).


def check_model_dir(path: Path, what: str, model: ModelConfig, weights: bool = True) -> None:
    """The directory ``path`` holds a model (config.json) whose code and weights ``model``
    allows to load; a ConfigError naming ``what`` otherwise. ``weights=False``: only its code
    (a hub model partly in the cache)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{what}: {path} is not a model directory (no config.json)")
    if not model.trust_remote_code:
        code = remote_code(path)
        if code:
            raise ConfigError(
                f"{what}: the model ships its own code ({', '.join(code)}), which loading it "
                "would run; set model.trust_remote_code=true only if you trust where it comes from"
            )
    if not weights:
        return
    safetensors = list(path.glob("*.safetensors"))
    pickles = sorted(
        p.name
        for pattern in PICKLE_PATTERNS
        for p in path.glob(pattern)
        if p.name not in NOT_WEIGHTS
    )
    if not safetensors and pickles and not model.allow_pickle:
        raise ConfigError(
            f"{what}: its weights are pickles ({', '.join(pickles)}), and loading a pickle can "
            "run arbitrary code; convert them to safetensors (load, then "
            "save_pretrained(..., safe_serialization=True)), or set model.allow_pickle=true "
            "only if you trust where they come from"
        )
    if not safetensors and not pickles:
        raise ConfigError(f"{what}: no model weights in {path} (model.safetensors)")


def remote_code(path: Path) -> list[str]:
    """What in a model (or tokenizer) directory is code that transformers would import:
    config.json's or tokenizer_config.json's ``auto_map``, and Python files."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            found.append(f"auto_map in {name}")
    found += sorted(p.name for p in path.glob("*.py"))
    return found
