"""The MLflow pyfunc models ``promote`` registers (logged by
``rlhf_tasks/tracking/logged_models.py``), answering through ``rlhf_tasks/serving.py``:

- ``ChatPolicy``: OpenAI-style chat requests (``{"messages": [...], "temperature": ...,
  "max_tokens": ..., "top_p": ..., "seed": ...}``) in, a ``chat.completion`` out; its default
  settings are the evaluation's.
- ``RewardScorer``: ``messages`` (ending with the assistant reply to score), or ``prompt`` and
  ``response``, in; a score each out.

A registered model is logged from code, not pickled: its ``model.py`` (``MODEL_CODE``) builds
one of these with ``mlflow.models.set_model``, its default settings are its ``model_config``
(and its signature's params, which MLflow fills a request's missing ones from), and it
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

from rlhf_tasks.serving import MODEL_ARTIFACT, Conversation, Sampling, replies, score

# The code a registered model is logged from (MLflow's models from code), by class name.
MODEL_CODE = """from mlflow.models import set_model

from rlhf_tasks.pyfunc import {cls}

set_model({cls}())
"""

# MLflow asks, when a PythonModel subclass is defined, for type hints on ``predict``; these
# models give their signature when they are logged instead (type hints would change how the
# scoring server parses requests).
# The message starts with a colour code.
warnings.filterwarnings(
    "ignore", message=r".*Add type hints to the `predict`", category=UserWarning
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


def _invalid(message: str) -> Exception:
    """A bad request: MLflow's scoring server answers it with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _settings(config: dict[str, Any] | None) -> Sampling:
    """The logged defaults (``model_config``), the keys ``Sampling`` knows."""
    known = Sampling.__dataclass_fields__
    return Sampling(**{k: v for k, v in (config or {}).items() if k in known})


class ChatPolicy(PythonModel):
    """The policy as a chat model: messages in, a ``chat.completion`` out (see the module)."""

    def load_context(self, context: Any) -> None:
        self.sampling = _settings(context.model_config)  # the evaluation's, as logged
        self.model, self.tokenizer = _load(context.artifacts[MODEL_ARTIFACT], causal=True)

    def request(self, params: dict[str, Any] | None) -> Sampling:
        """The request's settings (MLflow fills the ones it leaves out from the signature's
        defaults, which are the logged ones); temperature 0 is greedy decoding."""
        given = {k: v for k, v in (params or {}).items() if v is not None}
        default = self.sampling
        sampling = Sampling(
            max_new_tokens=int(given.get("max_tokens", default.max_new_tokens)),
            temperature=float(given.get("temperature", default.temperature)),
            top_p=float(given.get("top_p", default.top_p)),
            seed=int(given.get("seed", default.seed)),
            batch_size=default.batch_size,
        )
        if sampling.max_new_tokens < 1:
            raise _invalid(f"max_tokens must be at least 1, not {sampling.max_new_tokens}")
        if sampling.temperature < 0:
            raise _invalid(f"temperature must be 0 (greedy) or more, not {sampling.temperature}")
        if not 0 < sampling.top_p <= 1:
            raise _invalid(f"top_p must be in (0, 1], not {sampling.top_p}")
        return sampling

    # No type hints on predict's arguments: MLflow would read them as the model's signature.
    def predict(self, context, model_input, params=None):
        sampling = self.request(params)
        conversations = []
        for row in _rows(model_input):
            if not _is_list(row.get("messages")) or not len(row["messages"]):
                raise _invalid("each request needs `messages`: a list of {role, content}")
            conversations.append(_messages(row["messages"]))
        answers = replies(self.model, self.tokenizer, conversations, sampling)
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
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop" if ended else "length",
                        }
                    ],
                }
                for text, ended in answers
            ]
        )


class RewardScorer(PythonModel):
    """The reward model as a scorer: a float per request (see the module)."""

    def load_context(self, context: Any) -> None:
        self.batch_size = _settings(context.model_config).batch_size
        self.model, self.tokenizer = _load(context.artifacts[MODEL_ARTIFACT], causal=False)

    # No type hints on predict's arguments: MLflow would read them as the model's signature.
    def predict(self, context, model_input, params=None):
        conversations = []
        for i, row in enumerate(_rows(model_input)):
            if _is_list(row.get("messages")) and len(row["messages"]):
                conversation = _messages(row["messages"])
                if conversation[-1]["role"] != "assistant":
                    raise _invalid(f"request {i}: `messages` must end with the assistant reply")
            elif all(isinstance(row.get(k), str) for k in ("prompt", "response")):
                conversation = [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["response"]},
                ]
            else:
                raise _invalid(
                    f"request {i}: give `prompt` and `response` (strings), or `messages` "
                    "ending with the assistant reply"
                )
            conversations.append(conversation)
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
