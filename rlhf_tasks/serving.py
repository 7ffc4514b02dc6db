"""How the pipeline's models answer: one code path for the evaluation, `rlhf generate`, promotion
and the models MLflow serves.

- ``generate``: a sampled reply to each conversation, with the tokenizer's chat template and
  stopped at the end of the turn. The evaluation, promotion's champion-vs-challenger comparison
  and ``rlhf generate`` call it; so does the registered policy's ``predict``, so that, for the
  same conversation, seed and settings, they all say the same text.
- ``score``: the reward of each conversation ending with an assistant reply, read where
  RewardTrainer reads it. ``reward.score`` and the registered reward model's ``predict`` call it.
- ``ChatPolicy`` and ``RewardScorer``: the MLflow pyfunc models ``promote`` registers
  (``rlhf_tasks/tracking/logged_models.py``). The policy takes OpenAI-style chat requests
  (``{"messages": [...], "temperature": ..., "max_tokens": ..., "top_p": ..., "seed": ...}``) and
  answers with a ``chat.completion``; its default settings are the evaluation's. The reward model
  takes ``messages`` (ending with the assistant reply to score), or ``prompt`` and ``response``.

A leaf: it imports nothing from the project (the registered models carry this file and run
without the rest of it) and torch, transformers and MLflow only when called.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

try:  # the base class of the models MLflow loads; the functions above need no MLflow
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - MLflow is a dependency of the project
    PythonModel = object  # type: ignore[assignment,misc]

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    """How a reply is sampled (the evaluation's settings: params' ``evaluate`` section)."""

    max_new_tokens: int = 40
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64

    @classmethod
    def of(cls, settings: Any) -> Sampling:
        """The settings of an object with these attributes (params' ``evaluate`` section)."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


def generate(
    model: Any, tokenizer: Any, conversations: list[Conversation], sampling: Sampling
) -> list[str]:
    """One sampled reply per conversation, seeded once for the whole list: two models given
    the same conversations sample from the same random stream."""
    import torch

    torch.manual_seed(sampling.seed)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    texts: list[str] = []
    for i in range(0, len(conversations), sampling.batch_size):
        chats = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations[i : i + sampling.batch_size]
        ]
        enc = tokenizer(chats, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc.to(device),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=True,
                temperature=sampling.temperature,
                top_k=0,
                top_p=sampling.top_p,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,  # the end of the turn: the chat template's
            )
        texts.extend(
            tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return [t.strip() for t in texts]


def score(
    model: Any, tokenizer: Any, conversations: list[Conversation], batch_size: int = 64
) -> list[float]:
    """The reward of each conversation (its last message the assistant reply): the chat
    template's rendering, tokenized as RewardTrainer does, scored at the last token (right
    padding; the model finds the last non-pad token itself)."""
    import torch

    sequences = [
        tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
        for c in conversations
    ]
    # Longer than the model can read: keep the end, where the score is read.
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        sequences = [ids[-limit:] for ids in sequences]
    # Pad with the id the model looks for to find each sequence's last token.
    pad_id = model.config.pad_token_id
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        with torch.no_grad():
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits  # (batch, 1)
        scores.extend(logits[:, 0].float().cpu().tolist())
    return scores


# -- the registered models -------------------------------------------------------------------

MODEL_ARTIFACT = "model"  # the model directory, as an artifact of the pyfunc model


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

    def __init__(self, sampling: Sampling | None = None) -> None:
        self.sampling = sampling or Sampling()

    def load_context(self, context: Any) -> None:
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

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size

    def load_context(self, context: Any) -> None:
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
