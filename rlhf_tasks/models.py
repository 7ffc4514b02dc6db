"""Loading models safely: the one place that says how a model directory or hub id may be read.

Every ``from_pretrained`` of model weights takes ``model_kwargs`` (remote code only if
``model.trust_remote_code``, safetensors only unless ``model.allow_pickle``); tokenizers load
through ``load_tokenizer``; a directory is checked before anything loads it
(``check_model_location``, ``check_model_dir``, ``remote_code``): the preflight checks the models
a run starts from, and the registry checks a model before MLflow's loader would run its code or
unpickle its weights. A leaf: it imports only the config and the errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rlhf_tasks.config import ModelConfig
from rlhf_tasks.errors import ConfigError

# Weight files that are pickles: loading one runs whatever code it was made to run.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Files a checkpoint directory holds besides weights; pickles too, but never loaded as a model.
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
# What the hub accepts as a repo id: "name" or "org/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_kwargs(model: ModelConfig | None = None) -> dict[str, Any]:
    """The keyword arguments of every ``from_pretrained`` that loads model weights: remote code
    only if ``model.trust_remote_code``, safetensors only unless ``model.allow_pickle``
    (unpickling a ``pytorch_model.bin`` can run arbitrary code). Tokenizers and configs take
    ``trust_remote_code`` alone."""
    model = model or ModelConfig()
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if not model.allow_pickle:
        kwargs["use_safetensors"] = True
    return kwargs


def load_tokenizer(location: str, trust_remote_code: bool, what: str) -> Any:
    """The tokenizer at ``location``; a ConfigError that says what to do when it is missing."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{what}={location!r} could not be loaded ({str(exc).splitlines()[0]}); build it "
            "first with its stage, or check the path (offline runs need hub models in the local "
            "HF cache)"
        ) from None
    # transformers records HF_HUB_OFFLINE as `local_files_only` in the saved tokenizer_config;
    # dropped so that a saved model does not depend on the environment it was trained in.
    tokenizer.init_kwargs.pop("local_files_only", None)
    return tokenizer


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
