"""The rollout of one PPO update: sample responses to a batch of prompts, cut them after their
first EOS, score them, and turn the scores into per-token rewards and advantages.

Also the forward passes it needs (log-probs of the sampled tokens, the scalar head of a reward
or value model) and the prompts, rendered with the chat template. Shapes as in ``maths``:
B responses of T tokens; ``context_len`` is the width of the left-padded prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_tasks.config import PpoSection
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.ppo.maths import gae, masked_whiten, token_rewards, truncate_after_eos
from rlhf_tasks.rows import RowCounts


def sequence_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_len: int, temp: float
) -> torch.Tensor:
    """Log-probs (B, T) of the response tokens ``input_ids[:, context_len:]`` under ``model``.

    Logits are divided by the sampling temperature, so that they are the log-probs the tokens
    were sampled with (Huang et al., 2024, detail 8).

    Only the positions that predict response tokens go through the LM head
    (``logits_to_keep``): the prompt's logits are never computed. The log-softmax is taken only
    at the sampled tokens (their logit minus the log-sum-exp), not over the whole vocabulary.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding of the prompt
    responses = input_ids[:, context_len:]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=responses.shape[1] + 1,  # positions context_len - 1 ... end
        use_cache=False,  # one pass over whole sequences: a key/value cache is wasted memory
    ).logits
    logits = logits[:, :-1].float() / temp  # position t predicts token t + 1
    chosen = torch.gather(logits, 2, responses.unsqueeze(-1)).squeeze(-1)
    return chosen - logits.logsumexp(-1)


def token_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head of a sequence-classification model at every position, (B, L).

    The reward model's score of a sequence is this at its last real token; the value model's
    value of the state before response token t is this at position t - 1.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


@dataclass(frozen=True, eq=False)  # holds a tensor: compared by identity
class Columns:
    """The columns of a batch of left-padded prompts and right-padded responses that hold a
    real token in some row: the ones a forward pass needs. Dropping the others (prompt padding
    that every row has, response padding after the longest response) changes no real token's
    result: positions come from the attention mask, and padding is never attended to."""

    start: int  # the first column with a real prompt token in some row
    context_len: int  # the prompts' width after ``start``
    width: int  # the longest response, in tokens (at least 1)
    mask: torch.Tensor  # the responses' mask, (B, T): 1 up to and including the first EOS

    @classmethod
    def of(cls, attention: torch.Tensor, mask: torch.Tensor, context_len: int) -> Columns:
        start = int(attention[:, :context_len].any(0).int().argmax())
        width = max(1, int(mask.sum(1).max()))
        return cls(start, context_len - start, width, mask)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The kept columns of a (B, context_len + T) tensor."""
        return t[:, self.start : self.start + self.context_len + self.width]

    def expand(self, per_token: torch.Tensor) -> torch.Tensor:
        """A (B, width) result back to (B, T): 0 after each response's end."""
        full = torch.nn.functional.pad(per_token, (0, self.mask.shape[1] - self.width))
        return full * self.mask


def response_logprobs(
    model: Any, sequences: torch.Tensor, attention: torch.Tensor, cols: Columns, temp: float
) -> torch.Tensor:
    """``sequence_logprobs`` over the columns ``cols`` keeps, (B, T), 0 after each response's
    end (``cols.mask``)."""
    out = sequence_logprobs(
        model, cols.take(sequences), cols.take(attention), cols.context_len, temp
    )
    return cols.expand(out)


def response_values(
    critic: Any, sequences: torch.Tensor, attention: torch.Tensor, cols: Columns
) -> torch.Tensor:
    """The value model's value (B, T) of the state before each response token, computed over
    the columns ``cols`` keeps; 0 after each response's end."""
    out = critic(cols.take(sequences), cols.take(attention))[:, cols.context_len - 1 : -1]
    return cols.expand(out)


class ValueModel(torch.nn.Module):
    """The value model as a module whose forward is ``token_scores``, so that under DDP every
    call goes through the DDP wrapper (which synchronises the gradients)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_scores(self.model, input_ids, attention_mask)


def prompt_limit(cfg: PpoSection, tokenizer: Any) -> int | None:
    """The longest prompt PPO takes, in tokens: ``ppo.max_prompt_length``, or else the model's
    max length less the response's (None when the tokenizer declares no max length)."""
    if cfg.max_prompt_length is not None:
        return cfg.max_prompt_length
    model_max = getattr(tokenizer, "model_max_length", None)
    if not model_max or model_max > 1_000_000:  # transformers' "no limit" is a huge int
        return None
    return max(1, model_max - cfg.response_length)


def load_prompts(path: Path, tokenizer: Any, cfg: PpoSection) -> tuple[list[list[int]], RowCounts]:
    """Prompts rendered with the chat template's generation prompt, as token ids (a
    multi-turn prompt as its turns, as evaluation and the reward model see it), and what became
    of them: a prompt over ``prompt_limit`` tokens is dropped, or with ``truncate_prompts: left``
    keeps its last tokens (the turn to answer)."""
    prompts = [json.loads(line)["prompt"] for line in path.open(encoding="utf-8") if line.strip()]
    texts = [
        tokenizer.apply_chat_template(
            prompt_messages(p), add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    # The template writes the BOS itself.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    limit = prompt_limit(cfg, tokenizer)
    long = [i for i, row in enumerate(ids) if limit is not None and len(row) > limit]
    if cfg.truncate_prompts == "left":
        kept = [row[-limit:] if limit is not None else row for row in ids]
    else:
        skip = set(long)
        kept = [row for i, row in enumerate(ids) if i not in skip]
    setting = "ppo.max_prompt_length" if cfg.max_prompt_length else "the model's max length"
    counts = RowCounts(
        "policy",
        "ppo",
        read=len(ids),
        kept=len(kept),
        prompts_truncated=len(long) if cfg.truncate_prompts == "left" else 0,
        limit=f"{setting} = {limit} prompt tokens",
    )
    return kept, counts


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def draw_prompts(prompt_ids: list[list[int]], n: int, mine: slice) -> list[list[int]]:
    """A fresh random draw of ``n`` prompts for an update, and of those this process's share
    (``mine``). One ``torch.randperm`` on the global RNG, which the update has just seeded."""
    order = torch.randperm(len(prompt_ids))
    return [prompt_ids[i] for i in order[:n][mine].tolist()]


@dataclass
class Models:
    """The models a rollout runs, and the tokenizer they share."""

    accelerator: Any
    policy: Any  # as ``accelerator.prepare`` returned it; with LoRA a PEFT model
    critic: Any  # the ValueModel, prepared likewise (DDP-wrapped under several processes)
    scorer: Any  # the frozen reward model
    ref_policy: Any | None  # the frozen reference; None with LoRA (the adapter is disabled instead)
    tokenizer: Any
    # What the chat template writes after an answer's EOS (ChatML: "\n" after <|im_end|>): the
    # reward model was trained on, and scores at the end of, the rendered turn.
    end_of_turn: list[int] = field(default_factory=list)


def end_of_turn(tokenizer: Any) -> list[int]:
    """The token ids the tokenizer's chat template puts after the EOS that ends an assistant
    turn (ChatML's "<|im_end|>\n": the newline). A reward model trained on rendered chats
    (RewardTrainer, ``reward.score``) scores a response at the last of these, so PPO appends
    them to each response that ended with EOS before it reads the score. Empty when the
    template ends the turn with the EOS, or does not write the EOS at all."""
    eos = tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}],
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    if eos not in ids:
        return []
    last = len(ids) - 1 - ids[::-1].index(eos)
    return list(ids[last + 1 :])


def score_responses(
    models: Models,
    sequences: torch.Tensor,
    attention: torch.Tensor,
    last: torch.Tensor,
    has_eos: torch.Tensor,
) -> torch.Tensor:
    """The reward model's score (B,) of each sequence, read where it reads a rendered chat: at
    the last token of the template's end of turn after an EOS (``Models.end_of_turn``), at the
    last real token of a response without one."""
    suffix = models.end_of_turn
    rows = torch.arange(len(last), device=sequences.device)
    if not suffix:
        return token_scores(models.scorer, sequences, attention)[rows, last]
    width = len(suffix)
    pad_id = models.tokenizer.pad_token_id
    sequences = torch.nn.functional.pad(sequences, (0, width), value=pad_id)
    attention = torch.nn.functional.pad(attention, (0, width), value=0)
    tail = torch.tensor(suffix, device=sequences.device)
    for i in torch.nonzero(has_eos).flatten().tolist():
        at = int(last[i]) + 1
        sequences[i, at : at + width] = tail
        attention[i, at : at + width] = 1
    read_at = last + has_eos.long() * width
    return token_scores(models.scorer, sequences, attention)[rows, read_at]


def reference_logprobs(
    models: Models, sequences: torch.Tensor, attention: torch.Tensor, cols: Columns, temp: float
) -> torch.Tensor:
    """Log-probs (B, T) of the responses under the reference of the KL penalty: its own frozen
    copy of the initial policy or, with LoRA, the policy with its adapter disabled."""
    args = (sequences, attention, cols, temp)
    if models.ref_policy is not None:
        return response_logprobs(models.ref_policy, *args)
    with models.accelerator.unwrap_model(models.policy).disable_adapter():
        return response_logprobs(models.policy, *args)


def generation_config(cfg: PpoSection, pad_id: int, eos_id: int) -> Any:
    """The whole sampling configuration, from ``ppo`` params only: a checkpoint's own
    ``generation_config.json`` (a repetition penalty, top-p, a minimum length) would sample from
    another distribution than the log-probs, taken at ``temperature`` alone, assume."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        max_new_tokens=cfg.response_length,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )


@dataclass
class Rollout:
    """One update's batch: the sampled responses and everything the PPO epochs and the metrics
    need of them. Tensors are (B, T) unless said otherwise."""

    queries: torch.Tensor  # the left-padded prompts, (B, context_len)
    context_len: int
    sequences: torch.Tensor  # prompts then responses, (B, context_len + T)
    attention: torch.Tensor  # attention mask of ``sequences``, (B, context_len + T)
    mask: torch.Tensor  # 1 on response tokens up to and including the first EOS
    responses: torch.Tensor  # sampled tokens, padding after the first EOS
    logprobs: torch.Tensor  # under the policy that sampled them
    ref_logprobs: torch.Tensor  # under the reference
    values: torch.Tensor  # the value model's value of the state before each token
    scores: torch.Tensor  # the reward model's score of each sequence, (B,)
    has_eos: torch.Tensor  # whether each response ended with an EOS, (B,) bool
    kl: torch.Tensor  # per-token KL estimate logp - ref_logp
    rewards: torch.Tensor  # per-token rewards: KL penalty, plus the score on the last token
    advantages: torch.Tensor  # GAE, whitened over the real tokens
    returns: torch.Tensor  # the value targets


def rollout(
    models: Models,
    prompts: list[list[int]],
    cfg: PpoSection,
    kl_coef: float,
    clock: Callable[[str], AbstractContextManager[None]],
) -> Rollout:
    """Sample a response to each of ``prompts`` (token ids), cut it after its first EOS and
    score it with the reward model (less ``missing_eos_penalty`` without an EOS); then the
    per-token rewards with the KL penalty at ``kl_coef`` and GAE advantages, whitened over the
    real tokens. Only the sampling draws on the RNG. ``clock`` times the phases "generation"
    and "scoring"."""
    accelerator, policy = models.accelerator, models.policy
    pad_id, eos_id = models.tokenizer.pad_token_id, models.tokenizer.eos_token_id
    queries, query_mask = (t.to(accelerator.device) for t in _left_pad(prompts, pad_id))
    context_len = queries.shape[1]

    policy.eval()
    with torch.no_grad(), accelerator.autocast(), clock("generation"):
        generated = accelerator.unwrap_model(policy).generate(
            input_ids=queries,
            attention_mask=query_mask,
            generation_config=generation_config(cfg, pad_id, eos_id),
        )
        responses = generated[:, context_len:]
        responses = torch.nn.functional.pad(
            responses, (0, cfg.response_length - responses.shape[1]), value=pad_id
        )
        responses, mask = truncate_after_eos(responses, eos_id, pad_id)
    # Every model under the same autocast as the policy's training forwards (bf16 or none): the
    # reference's log-probs equal the policy's before the first update, so the KL starts at 0.
    with torch.no_grad(), accelerator.autocast(), clock("scoring"):
        sequences = torch.cat([queries, responses], dim=1)  # (B, context_len + T)
        attention = torch.cat([query_mask, mask], dim=1)
        cols = Columns.of(attention, mask, context_len)  # the forward passes skip the rest
        logprobs = response_logprobs(policy, sequences, attention, cols, cfg.temperature)
        ref_logprobs = reference_logprobs(models, sequences, attention, cols, cfg.temperature)
        values = response_values(models.critic, sequences, attention, cols)
        last = context_len - 1 + mask.sum(1)  # position of each sequence's last real token
        has_eos = (responses == eos_id).any(1)
        scores = score_responses(
            models, cols.take(sequences), cols.take(attention), last - cols.start, has_eos
        )
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)

        # Rewards with the KL penalty, then GAE advantages, whitened over real tokens.
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
    return Rollout(
        queries=queries,
        context_len=context_len,
        sequences=sequences,
        attention=attention,
        mask=mask,
        responses=responses,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        has_eos=has_eos,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )
