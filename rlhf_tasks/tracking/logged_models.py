"""Models in MLflow: logged as pyfunc models that answer as the pipeline does
(``rlhf_tasks/serving.py``), loaded back only as params allow."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf_tasks import serving
from rlhf_tasks.config import ModelConfig, Params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.models import check_model_dir, load_tokenizer, model_kwargs, remote_code
from rlhf_tasks.stages import Stage


def log_model(stage: Stage, model_dir: Path, params: Params) -> str:
    """Log the model in ``model_dir`` to the active run as an MLflow pyfunc model that answers
    as the pipeline does (``rlhf_tasks/serving.py``): the policy as a chat model whose default
    settings are the evaluation's, the reward model as a scorer. Return the logged model's id
    (what ``promote`` registers).

    The model directory is the pyfunc's artifact ``model`` (``artifacts/model/``), as the stage
    wrote it; the model carries ``serving.py`` and ``pyfunc.py`` (``code/rlhf_tasks/``), so it
    loads and serves with torch, transformers and MLflow, without the pipeline installed.
    """
    import mlflow

    from rlhf_tasks import pyfunc  # MLflow's pyfunc API: imported when a model is logged

    check_model_dir(model_dir, f"the {stage.name} model", params.model)
    causal = stage.registers == "text-generation"
    settings = serving.Sampling.of(params.evaluate)
    if causal:
        cls, signature = pyfunc.ChatPolicy, pyfunc.chat_signature(settings)
        example: dict[str, Any] = {"messages": [{"role": "user", "content": "Tell me about cats."}]}
    else:
        cls, signature = pyfunc.RewardScorer, pyfunc.reward_signature()
        example = {"prompt": ["Tell me about cats."], "response": ["Cats purr when content."]}
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp, "rlhf_tasks")
        package.mkdir()
        (package / "__init__.py").write_text('"""The serving code of the RLHF pipeline."""\n')
        for module in (serving, pyfunc):
            shutil.copy(module.__file__, package / Path(module.__file__).name)
        code = Path(tmp, "model.py")  # models from code: nothing of it is pickled
        code.write_text(pyfunc.MODEL_CODE.format(cls=cls.__name__))
        info = mlflow.pyfunc.log_model(
            name=stage.name,
            python_model=str(code),
            model_config=dataclasses.asdict(settings),
            artifacts={serving.MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(package)],
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"task": "llm/v1/chat" if causal else "reward", "stage": stage.name},
        )
    return info.model_id


def load_logged_model(uri: str, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The components (``model``, ``tokenizer``) of a model logged by ``log_model``, at ``uri``
    (``models:/NAME/VERSION``), checked first as the preflight checks a model directory: a
    registry is shared, and a model's own code or pickled weights would run on loading. A
    ConfigError unless ``model_cfg`` (params' ``model``) allows it. The model directory is
    loaded as a stage's model is, not through MLflow's loader (which runs the model's code)."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_cfg = model_cfg or ModelConfig()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))  # a local store: no copy
    model_dir, tokenizer_dir = _model_dirs(local, uri)
    check_model_dir(model_dir, uri, model_cfg)
    tokenizer_code = remote_code(tokenizer_dir)
    if tokenizer_code and not model_cfg.trust_remote_code:
        raise ConfigError(
            f"{uri}: its tokenizer ships its own code ({', '.join(tokenizer_code)}), which "
            "loading it would run; set model.trust_remote_code=true only if you trust its source"
        )
    config = json.loads((model_dir / "config.json").read_text())
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    load = model_kwargs(model_cfg)
    return {
        "model": auto.from_pretrained(model_dir, **load),
        "tokenizer": load_tokenizer(str(tokenizer_dir), load["trust_remote_code"], uri),
    }


def _model_dirs(local: Path, uri: str) -> tuple[Path, Path]:
    """Where the logged model in ``local`` keeps its model and its tokenizer: the pyfunc's
    artifact ``model`` (both), or, for a version registered before the pipeline logged pyfunc
    models, the transformers flavor's ``model/`` and ``components/tokenizer/``."""
    import yaml

    try:
        flavors = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    except (OSError, KeyError, TypeError) as exc:
        raise ConfigError(f"{uri} is not an MLflow model: {exc}") from None
    artifact = (flavors.get("python_function", {}).get("artifacts") or {}).get(
        serving.MODEL_ARTIFACT
    )
    if artifact:
        return local / artifact["path"], local / artifact["path"]
    if "transformers" in flavors:
        return local / "model", local / "components" / "tokenizer"
    raise ConfigError(
        f"{uri} is not a model the pipeline logged (no pyfunc artifact "
        f"{serving.MODEL_ARTIFACT!r} and no transformers flavor in its MLmodel)"
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "accelerate")]
