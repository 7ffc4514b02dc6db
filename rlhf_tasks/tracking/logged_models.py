"""Models in MLflow: logged with the transformers flavor, loaded back only as params allow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_tasks.config import ModelConfig
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.models import check_model_dir, load_tokenizer, model_kwargs, remote_code
from rlhf_tasks.stages import Stage


def log_model(stage: Stage, model_dir: Path, model_cfg: ModelConfig | None = None) -> str:
    """Log the model in ``model_dir`` to the active run with MLflow's transformers flavor; return
    the logged model's id (what ``promote`` registers).

    MLflow 3.17 can log a checkpoint directory without loading it, but that path breaks on
    transformers 5 (it expects the pipeline class where transformers now gives its name), so
    the model is loaded on the CPU and saved by the flavor: one more copy of the weights.
    """
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    causal = stage.registers == "text-generation"
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    load = model_kwargs(model_cfg)
    components = {
        "model": auto.from_pretrained(model_dir, **load),
        "tokenizer": load_tokenizer(
            str(model_dir), load["trust_remote_code"], f"{stage.name} model"
        ),
    }
    info = mlflow.transformers.log_model(
        components,
        name=stage.name,
        task=stage.registers,
        model_card=_model_card(stage.name, model_dir),  # given: MLflow then asks no hub for one
        pip_requirements=_requirements(),
    )
    return info.model_id


def load_logged_model(uri: str, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The components (``model``, ``tokenizer``) of a model logged by ``log_model``, at ``uri``
    (``models:/NAME/VERSION``), checked first as the preflight checks a model directory: a
    registry is shared, and MLflow's loader would run a model's own code and unpickle its
    weights without asking. A ConfigError unless ``model_cfg`` (params' ``model``) allows it."""
    import mlflow

    model_cfg = model_cfg or ModelConfig()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))  # a local store: no copy
    check_model_dir(local / "model", uri, model_cfg)
    tokenizer_code = remote_code(local / "components" / "tokenizer")
    if tokenizer_code and not model_cfg.trust_remote_code:
        raise ConfigError(
            f"{uri}: its tokenizer ships its own code ({', '.join(tokenizer_code)}), which "
            "loading it would run; set model.trust_remote_code=true only if you trust its source"
        )
    return mlflow.transformers.load_model(str(local), return_type="components")


def _model_card(stage: str, model_dir: Path) -> Any:
    from huggingface_hub import ModelCard

    # The license is the base model's and the data's, which the pipeline cannot know.
    return ModelCard(
        "---\nlicense: unknown\nlibrary_name: transformers\n---\n"
        f"# {stage} model\n\nTrained by the `{stage}` stage of the RLHF pipeline from "
        f"`{model_dir}`. Its lineage (data md5, git commit, params) is on the MLflow run "
        "and on the registered model version's tags: `rlhf lineage NAME/VERSION`.\n"
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "accelerate")]
