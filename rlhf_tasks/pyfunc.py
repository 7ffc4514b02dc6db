"""The MLflow pyfunc models ``promote`` registers (logged by
``rlhf_tasks/tracking/logged_models.py``), answering through ``rlhf_tasks/serving.py``:

- ``ChatPolicy``: OpenAI-style chat requests (``{"messages": [...], "temperature": ...,
  "max_tokens": ..., "top_p": ..., "seed": ...}``) in, a ``chat.completion`` out; its default
  settings are the evaluation's.
- ``RewardScorer``: ``messages`` (ending with the assistant reply to score), or ``prompt`` and
  ``response``, in; a score each out.

A registered model is logged from code, not pickled: its ``model.py`` (``MODEL_CODE``) builds
one of these with ``mlflow.models.set_model``, its settings are its ``model_config``, and it
carries this file and ``serving.py`` (``code/rlhf_tasks/``), so it needs nothing else of the
project, and loading it unpickles nothing.
"""

from __future__ import annotations

import time
import uuid
import warnings
from dataclasses import asdict
from typing import Any

from mlflow.pyfunc import PythonModel

from rlhf_tasks.serving import MODEL_ARTIFACT, Conversation, Sampling, generate, score

# The code a registered model is logged from (MLflow's models from code), by class name.
MODEL_CODE = """from mlflow.models import set_model

from rlhf_tasks.pyfunc import {cls}

set_model({cls}())
"""

# MLflow asks, when a PythonModel subclass is defined, for type hints on ``predict``; these
# models give their signature when they are logged instead (type hints would change how the
# scoring server parses requests).
warnings.filterwarnings(
    "ignore", message="Add type hints to the `predict` method", category=UserWarning
)


def _load(path: str, causal: bool) -> tuple[Any, Any]:
    """A model directory the pipeline wrote (safetensors, no code of its own), on a GPU if any."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """The requests in what MLflow hands ``predict``: a DataFrame (one request a row), a list
    of requests, or one request (a dict). MLflow hands columns (``{"prompt": [...], ...}``) as
    one row of lists: they are one request per item."""
    if hasattr(model_input, "to_dict"):
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        records = [model_input]
    else:
        records = list(model_input)
    return [row for record in records for row in _items(record)]


def _is_list(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, str | dict)


def _items(record: dict[str, Any]) -> list[dict[str, Any]]:
    messages = record.get("messages")
    if _is_list(messages) and len(messages) and isinstance(messages[0], dict):
        return [record]  # one conversation
    columns = {k: list(v) for k, v in record.items() if _is_list(v)}
    if not columns:
        return [record]
    rows = zip(*columns.values(), strict=True)
    return [{**record, **dict(zip(columns, values, strict=True))} for values in rows]


def _messages(value: Any) -> Conversation:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in list(value)]


def _one_or_all(answers: list[Any]) -> Any:
    """One request, one answer (the chat API's shape); several, a list in their order."""
    return answers[0] if len(answers) == 1 else answers


class ChatPolicy(PythonModel):
    """The policy as a chat model: messages in, a ``chat.completion`` out (see the module)."""

    def load_context(self, context: Any) -> None:
        # The default settings: the model_config it was logged with (the evaluation's).
        self.sampling = Sampling(**(context.model_config or {}))
        self.model, self.tokenizer = _load(context.artifacts[MODEL_ARTIFACT], causal=True)

    # No type hints on predict's arguments: MLflow would read them as the model's signature.
    def predict(self, context, model_input, params=None):
        given = {k: v for k, v in (params or {}).items() if v is not None}
        default = self.sampling
        sampling = Sampling(
            max_new_tokens=int(given.get("max_tokens", default.max_new_tokens)),
            temperature=float(given.get("temperature", default.temperature)),
            top_p=float(given.get("top_p", default.top_p)),
            seed=int(given.get("seed", default.seed)),
            batch_size=default.batch_size,
        )
        conversations = [_messages(row["messages"]) for row in _rows(model_input)]
        replies = generate(self.model, self.tokenizer, conversations, sampling)
        created = int(time.time())
        return _one_or_all(
            [
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": created,
                    "model": "policy",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                }
                for reply in replies
            ]
        )


class RewardScorer(PythonModel):
    """The reward model as a scorer: a float per request (see the module)."""

    def load_context(self, context: Any) -> None:
        self.batch_size = int((context.model_config or {}).get("batch_size", 64))
        self.model, self.tokenizer = _load(context.artifacts[MODEL_ARTIFACT], causal=False)

    # No type hints on predict's arguments: MLflow would read them as the model's signature.
    def predict(self, context, model_input, params=None):
        conversations = []
        for row in _rows(model_input):
            if _is_list(row.get("messages")) and len(row["messages"]):
                conversations.append(_messages(row["messages"]))
            else:
                conversations.append(
                    [
                        {"role": "user", "content": str(row["prompt"])},
                        {"role": "assistant", "content": str(row["response"])},
                    ]
                )
        return score(self.model, self.tokenizer, conversations, self.batch_size)


def chat_signature(sampling: Sampling) -> Any:
    """The policy's MLflow signature: messages in, a chat completion out; the settings as
    params whose defaults are ``sampling``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    defaults = asdict(sampling)
    return ModelSignature(
        inputs=Schema([ColSpec(Array(message), "messages")]),
        params=ParamSchema(
            [
                ParamSpec("max_tokens", "long", defaults["max_new_tokens"]),
                ParamSpec("temperature", "double", defaults["temperature"]),
                ParamSpec("top_p", "double", defaults["top_p"]),
                ParamSpec("seed", "long", defaults["seed"]),
            ]
        ),
    )


def reward_signature() -> Any:
    """The reward model's MLflow signature: ``messages``, or ``prompt`` and ``response``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(Array(message), "messages", required=False),
                ColSpec("string", "prompt", required=False),
                ColSpec("string", "response", required=False),
            ]
        ),
        outputs=Schema([ColSpec("double")]),
    )
