"""How the pipeline's models answer: one code path for the evaluation, `rlhf generate`, promotion
and the models MLflow serves.

- ``generate``: a sampled reply to each conversation, with the tokenizer's chat template and
  stopped at the end of the turn. The evaluation, promotion's champion-vs-challenger comparison
  and ``rlhf generate`` call it; so does the registered policy's ``predict``, so that, for the
  same conversation, seed and settings, they all say the same text.
- ``score``: the reward of each conversation ending with an assistant reply, read where
  RewardTrainer reads it. ``reward.score`` and the registered reward model's ``predict`` call it.

The MLflow models that call them are in ``rlhf_tasks/pyfunc.py``. A leaf: it imports nothing
from the project (the registered models carry this file and run without the rest of it), and
torch and transformers only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Conversation = list[dict[str, str]]
MODEL_ARTIFACT = "model"  # a registered model's model directory, as its pyfunc artifact


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
    return [text for text, _ in replies(model, tokenizer, conversations, sampling)]


def replies(
    model: Any, tokenizer: Any, conversations: list[Conversation], sampling: Sampling
) -> list[tuple[str, bool]]:
    """``generate``'s replies, each with whether it ended its turn (False: cut at
    ``max_new_tokens``). Temperature 0 is greedy decoding."""
    import torch

    torch.manual_seed(sampling.seed)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    how: dict[str, Any] = {"do_sample": False}
    if sampling.temperature > 0:
        how = {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_k": 0,
            "top_p": sampling.top_p,
        }
    out_replies: list[tuple[str, bool]] = []
    for i in range(0, len(conversations), sampling.batch_size):
        chats = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations[i : i + sampling.batch_size]
        ]
        enc = tokenizer(chats, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc.to(device),
                **how,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,  # the end of the turn: the chat template's
            )
        new = out[:, enc["input_ids"].shape[1] :]
        ended = (new == tokenizer.eos_token_id).any(dim=1).tolist()
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        out_replies.extend((t.strip(), e) for t, e in zip(texts, ended, strict=True))
    return out_replies


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
