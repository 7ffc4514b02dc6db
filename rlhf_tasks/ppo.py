"""Stage ``ppo``: our own PPO for language models (TRL removed its PPO trainer in 1.13).

This module holds the PPO maths as plain functions on tensors, each tested with hand-computed
values in ``tests/code/test_ppo_math.py``, then the trainer that uses them (``train``: rollout,
scoring, PPO epochs, checkpoints that resume exactly). The algorithm is
the InstructGPT form (Ouyang et al., 2022; Ziegler et al., 2019, "Fine-Tuning Language Models
from Human Preferences"), with the details of "The N Implementation Details of RLHF with PPO"
(Huang et al., 2024) that TRL's PPOTrainer used:

- responses are cut after their first EOS; every tensor below carries a ``mask`` of shape
  (batch, response_len) that is 1 on response tokens up to and including that EOS, 0 after;
- per-token reward ``r_t = -kl_coef * (logp_t - ref_logp_t)``, plus the reward model's score on
  the last real token;
- advantages by GAE over the response tokens, whitened over the batch's real tokens;
- clipped policy loss and clipped value loss, means over real tokens;
- a fixed or adaptive KL coefficient (Ziegler et al., section 2.2).

Shapes: B = batch size, T = response length (tokens after the prompt). Log-probabilities are
natural logs of the sampled tokens, shape (B, T).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_tasks.config import ModelConfig, PpoSection
from rlhf_tasks.training import (
    checkpoint_error,
    claim_checkpoints,
    load_tokenizer,
    lora_config,
    model_kwargs,
)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for each token up to and including the first EOS of each row, 0 after it. (B, T) long."""
    is_eos = responses == eos_token_id
    # Tokens strictly after the first EOS are those with an EOS before them.
    eos_before = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return (~eos_before).long()


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace everything after the first EOS with padding; return (responses, mask)."""
    mask = response_mask(responses, eos_token_id)
    return responses.masked_fill(mask == 0, pad_token_id), mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default, as TRL did)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T) and the per-token KL estimate (B, T).

    ``r_t = -kl_coef * (logp_t - ref_logp_t)`` on every real token, and the sequence score (B,)
    added on the last real token. The KL estimate is the k1 estimator ``logp - ref_logp``
    (unbiased for KL(policy || ref) under samples from the policy).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # index of the last real token, (B,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` = 0 after the last real token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``= A + V`` (the value targets).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor  # share of real tokens whose ratio was clipped
    approxkl: torch.Tensor  # 0.5 * E[(logp_new - logp_old)^2], the "policy/approxkl" metric
    ratio: torch.Tensor  # mean ratio over real tokens


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> PolicyLoss:
    """PPO's clipped surrogate: mean over real tokens of max(-A * r, -A * clip(r, 1 - e, 1 + e))."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return PolicyLoss(
        loss=masked_mean(torch.max(unclipped, clipped), mask),
        clipfrac=masked_mean((clipped > unclipped).float(), mask),
        approxkl=0.5 * masked_mean(log_ratio**2, mask),
        ratio=masked_mean(ratio, mask),
    )


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)`` and its clip fraction."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_range, clip_range)
    loss_unclipped = (new_values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask)


class KLController:
    """The KL coefficient: fixed, or adaptive towards ``target`` (Ziegler et al., 2019, 2.2).

    Adaptive: ``e = clip(KL / target - 1, -0.2, 0.2)``, ``kl_coef *= 1 + e * n_steps / horizon``
    after each batch, where ``KL`` is the batch's mean sequence KL and ``n_steps`` its number of
    episodes. Its state is one float, saved in checkpoints.
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


# -- the trainer --------------------------------------------------------------------------------
#
# One update = one rollout batch: sample responses to `rollout_batch_size` prompts, score them,
# compute advantages, then `ppo_epochs` passes of minibatch updates of the policy and the value
# model. All randomness of update `u` comes from seeding with `seed + u` at its start, so a run
# resumed from a checkpoint makes exactly the updates an uninterrupted run makes.


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
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


class ValueModel(torch.nn.Module):
    """The value model as a module whose forward is ``token_scores``, so that under DDP every
    call goes through the DDP wrapper (which synchronises the gradients)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_scores(self.model, input_ids, attention_mask)


def load_prompts(path: Path, tokenizer: Any) -> list[list[int]]:
    """Prompts rendered with the chat template's generation prompt, as token ids."""
    prompts = [json.loads(line)["prompt"] for line in path.open(encoding="utf-8") if line.strip()]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    # The template writes the BOS itself.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    found = [
        p
        for p in (out_dir / "checkpoints").glob("update-*")
        if p.name.split("-")[1].isdigit() and (p / "state.pt").exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _fsync(directory: Path) -> None:
    """Flush a directory's files and the directory itself to disk."""
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _State:
    """What a checkpoint holds besides the metrics: everything an update changes."""

    accelerator: Any
    policy: Any
    value_model: Any
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer
    policy_sched: Any
    value_sched: Any
    kl_ctl: KLController

    def _plain(self, name: str) -> Any:
        """The model without its DDP and ValueModel wrappers (the checkpoint's format)."""
        model = self.accelerator.unwrap_model(getattr(self, name))
        return model.model if isinstance(model, ValueModel) else model

    def save(self, path: Path, history: list[dict], keep: int) -> None:
        """Weights, optimizers, schedulers, KL coefficient and the metrics so far, written to a
        temporary directory renamed into place: a checkpoint is complete or absent. (The RNG
        needs no saving: each update seeds itself.)"""
        from safetensors.torch import save_model

        tmp = path.with_name(path.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in ("policy", "value_model"):
                save_model(self._plain(name), str(tmp / f"{name}.safetensors"))  # LoRA or not
            torch.save(
                {
                    "policy_opt": self.policy_opt.state_dict(),
                    "value_opt": self.value_opt.state_dict(),
                    "policy_sched": self.policy_sched.state_dict(),
                    "value_sched": self.value_sched.state_dict(),
                    "kl_ctl": self.kl_ctl.state_dict(),
                    "update": int(path.name.split("-")[1]),
                },
                tmp / "state.pt",
            )
            (tmp / "history.json").write_text(json.dumps(history))
            _fsync(tmp)  # on disk before it is renamed into place, not only in the page cache
        except Exception as exc:  # a full disk: OSError, or torch.save's RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            previous = _checkpoint_dirs(path.parent.parent)
            raise checkpoint_error(path, exc, previous[-1] if previous else None) from exc
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in _checkpoint_dirs(path.parent.parent)[:-keep]:  # path: out/checkpoints/update-N
            shutil.rmtree(old)

    def load(self, path: Path) -> tuple[int, list[dict]]:
        """Restore a checkpoint; return (updates done, metrics so far)."""
        from safetensors.torch import load_model

        for name in ("policy", "value_model"):
            load_model(self._plain(name), str(path / f"{name}.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True)
        for name in ("policy_opt", "value_opt", "policy_sched", "value_sched", "kl_ctl"):
            getattr(self, name).load_state_dict(state[name])
        return state["update"], json.loads((path / "history.json").read_text())


def train(
    cfg: PpoSection,
    *,
    policy: str | Path,
    reward_model: str | Path,
    prompts: str | Path,
    out_dir: Path,
    value_model: str | Path | None = None,
    run_id: str = "",
    model_cfg: ModelConfig | None = None,
    on_update: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run PPO from the model at ``policy`` (also the frozen reference of the KL penalty) against
    the reward model at ``reward_model``, on the prompts of a JSONL file; the value model starts
    from ``value_model`` (default: the reward model). Resumes from the last checkpoint in
    ``out_dir/checkpoints`` if they were written by the same ``run_id`` (a digest of params and
    inputs; see ``training.claim_checkpoints``). Writes the policy to ``out_dir/model`` (a plain
    model directory; a LoRA adapter is merged), the per-update metrics to
    ``out_dir/history.jsonl`` and the final metrics to ``out_dir/metrics.json``. The main
    process calls ``on_update(row)`` with each update's metrics (row["update"] is the step).
    The result's ``timing`` says where this process's time went (``PhaseClock.report``).
    Models load as ``model_cfg`` (params' ``model``) allows: see ``training.model_kwargs``."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available()
    )
    device = accelerator.device
    remote = model_kwargs(model_cfg)  # remote code and pickled weights only if params allow
    tokenizer = load_tokenizer(str(policy), remote["trust_remote_code"], "policy")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    # Models: the policy; the frozen reference for the KL penalty (a copy of the initial policy,
    # or with LoRA the policy with its adapter disabled); the frozen reward model; the value model.
    policy_model = AutoModelForCausalLM.from_pretrained(policy, **remote)
    ref_policy = None
    if cfg.lora.enabled:
        from peft import get_peft_model

        policy_model = get_peft_model(policy_model, lora_config(cfg.lora, "CAUSAL_LM"))
    else:
        ref_policy = AutoModelForCausalLM.from_pretrained(policy, **remote).to(device).eval()
    scorer = AutoModelForSequenceClassification.from_pretrained(reward_model, **remote)
    scorer = scorer.to(device).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(
        value_model or reward_model, **remote
    )
    for model in (policy_model, critic):
        for module in model.modules():  # PPO's ratios need deterministic forward passes
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    critic = ValueModel(critic)

    n_updates = max(1, cfg.total_episodes // cfg.rollout_batch_size)
    trainable = [p for p in policy_model.parameters() if p.requires_grad]
    # foreach: one kernel per step for all tensors (PyTorch picks it on CUDA only by default).
    policy_opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, eps=1e-5, foreach=True)
    value_opt = torch.optim.AdamW(
        critic.parameters(), lr=cfg.value_learning_rate, eps=1e-5, foreach=True
    )
    # Linear decay to 0 over the run, one scheduler step per update.
    policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, lambda u: 1 - u / n_updates)
    value_sched = torch.optim.lr_scheduler.LambdaLR(value_opt, lambda u: 1 - u / n_updates)
    policy_model, critic, policy_opt, value_opt = accelerator.prepare(
        policy_model, critic, policy_opt, value_opt
    )
    state = _State(
        accelerator,
        policy_model,
        critic,
        policy_opt,
        value_opt,
        policy_sched,
        value_sched,
        KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon),
    )
    kl_ctl = state.kl_ctl

    def reference_logprobs(sequences: torch.Tensor, attention: torch.Tensor, context_len: int):
        if ref_policy is not None:
            return sequence_logprobs(ref_policy, sequences, attention, context_len, cfg.temperature)
        with accelerator.unwrap_model(policy_model).disable_adapter():
            return sequence_logprobs(
                policy_model, sequences, attention, context_len, cfg.temperature
            )

    prompt_ids = load_prompts(Path(prompts), tokenizer)
    start, history = 0, []
    if accelerator.is_main_process:  # checkpoints of another run are removed, not resumed
        claim_checkpoints(out_dir / "checkpoints", run_id)
    accelerator.wait_for_everyone()
    checkpoints = _checkpoint_dirs(out_dir)
    if checkpoints:
        start, history = state.load(checkpoints[-1])
        print(f"resuming from {checkpoints[-1]}")
    resumed_from = start

    # With several processes (DDP under `accelerate launch`) each answers its own share of the
    # update's prompts; gradients are averaged by DDP, the logged statistics by a reduce.
    per_process = cfg.rollout_batch_size // accelerator.num_processes
    mine = slice(
        accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process
    )
    clock = PhaseClock(device)
    loop_start = time.perf_counter()
    progress = tqdm(
        range(start, n_updates),
        desc="ppo",
        initial=start,
        total=n_updates,
        disable=not accelerator.is_main_process,
    )
    for update in progress:
        torch.manual_seed(cfg.seed + update)
        order = torch.randperm(len(prompt_ids))  # a fresh draw of prompts per update
        batch = [prompt_ids[i] for i in order[: cfg.rollout_batch_size][mine].tolist()]
        queries, query_mask = (t.to(device) for t in _left_pad(batch, pad_id))
        context_len = queries.shape[1]

        # 1. Rollout: sample, cut after the first EOS, score.
        policy_model.eval()
        with torch.no_grad(), clock("generation"):
            generated = accelerator.unwrap_model(policy_model).generate(
                input_ids=queries,
                attention_mask=query_mask,
                max_new_tokens=cfg.response_length,
                do_sample=True,
                temperature=cfg.temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            responses = generated[:, context_len:]
            responses = torch.nn.functional.pad(
                responses, (0, cfg.response_length - responses.shape[1]), value=pad_id
            )
            responses, mask = truncate_after_eos(responses, eos_id, pad_id)
        with torch.no_grad(), clock("scoring"):
            sequences = torch.cat([queries, responses], dim=1)  # (B, context_len + T)
            attention = torch.cat([query_mask, mask], dim=1)
            logprobs = sequence_logprobs(
                policy_model, sequences, attention, context_len, cfg.temperature
            )
            ref_logprobs = reference_logprobs(sequences, attention, context_len)
            values = critic(sequences, attention)[:, context_len - 1 : -1]
            last = context_len - 1 + mask.sum(1)  # position of each sequence's last real token
            scores = token_scores(scorer, sequences, attention)[torch.arange(len(last)), last]
            has_eos = (responses == eos_id).any(1)
            if cfg.missing_eos_penalty is not None:
                scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)

            # 2. Rewards with the KL penalty, then GAE advantages, whitened over real tokens.
            rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask)

        # 3. PPO epochs over shuffled minibatches.
        with clock("optimisation"):
            policy_model.train()
            critic.train()
            stats: dict[str, list[float]] = {
                k: [] for k in ("pg", "vf", "approxkl", "clip", "vclip")
            }
            stats["ratio"] = []
            for _ in range(cfg.ppo_epochs):
                for idx in torch.randperm(len(batch)).split(cfg.mini_batch_size):
                    seq, att, m = sequences[idx], attention[idx], mask[idx]
                    new_logprobs = sequence_logprobs(
                        policy_model, seq, att, context_len, cfg.temperature
                    )
                    pg = policy_loss(new_logprobs, logprobs[idx], advantages[idx], m, cfg.cliprange)
                    new_values = critic(seq, att)[:, context_len - 1 : -1]
                    vf, vclip = value_loss(
                        new_values, values[idx], returns[idx], m, cfg.cliprange_value
                    )
                    accelerator.backward(pg.loss + cfg.vf_coef * vf)
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    accelerator.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                    policy_opt.step()
                    value_opt.step()
                    policy_opt.zero_grad()
                    value_opt.zero_grad()
                    for key, value in zip(
                        ("pg", "vf", "approxkl", "clip", "vclip", "ratio"),
                        (pg.loss, vf, pg.approxkl, pg.clipfrac, vclip, pg.ratio),
                        strict=True,
                    ):
                        stats[key].append(value.item())
            policy_sched.step()
            value_sched.step()

        # 4. Metrics under TRL's names, the KL controller, a checkpoint now and then.
        mean_kl = kl.sum(1).mean().item()
        row = {
            "update": update + 1,
            "episode": (update + 1) * cfg.rollout_batch_size,
            "objective/kl": mean_kl,
            "objective/scores": scores.mean().item(),
            "objective/rlhf_reward": (scores - kl_ctl.value * kl.sum(1)).mean().item(),
            "objective/kl_coef": kl_ctl.value,
            "policy/approxkl_avg": _mean(stats["approxkl"]),
            "policy/clipfrac_avg": _mean(stats["clip"]),
            "loss/policy_avg": _mean(stats["pg"]),
            "loss/value_avg": _mean(stats["vf"]),
            "val/clipfrac_avg": _mean(stats["vclip"]),
            "val/ratio": _mean(stats["ratio"]),
            "val/ratio_first": stats["ratio"][0],
            "val/approxkl_first": stats["approxkl"][0],
            "val/num_eos_tokens": has_eos.sum().item(),
            "val/response_length": mask.sum(1).float().mean().item(),
            "lr": policy_sched.get_last_lr()[0],
        }
        if accelerator.num_processes > 1:  # the whole update's statistics, not this process's
            values = accelerator.reduce(torch.tensor(list(row.values()), device=device), "mean")
            row = dict(zip(row, values.tolist(), strict=True))
            row["update"], row["episode"] = update + 1, (update + 1) * cfg.rollout_batch_size
            mean_kl = row["objective/kl"]
        history.append(row)
        if on_update is not None and accelerator.is_main_process:
            on_update(row)
        kl_ctl.update(mean_kl, cfg.rollout_batch_size)
        progress.set_postfix(score=f"{row['objective/scores']:.2f}", kl=f"{mean_kl:.2f}")
        save = (update + 1) % cfg.save_every == 0 or update + 1 == n_updates
        if save and accelerator.is_main_process:
            state.save(
                out_dir / "checkpoints" / f"update-{update + 1}", history, cfg.keep_checkpoints
            )
        accelerator.wait_for_everyone()

    timing = clock.report(
        (n_updates - start) * cfg.rollout_batch_size,
        setup_s=loop_start - started,
        loop_s=time.perf_counter() - loop_start,
    )
    model_dir = out_dir / "model"
    final = history[-1] if history else {}
    metrics = {k: v for k, v in final.items() if "/" in k}
    if accelerator.is_main_process:
        final_policy = accelerator.unwrap_model(policy_model)
        if cfg.lora.enabled:
            final_policy = final_policy.merge_and_unload()
        shutil.rmtree(model_dir, ignore_errors=True)
        final_policy.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        with (out_dir / "history.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in history)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    return {
        "outputs": {"model": str(model_dir), "history": str(out_dir / "history.jsonl")},
        "metrics": metrics,
        "resumed_from_update": resumed_from,
        "num_processes": accelerator.num_processes,
        "timing": timing,
    }


class PhaseClock:
    """Wall seconds spent in each phase of the updates (``with clock("generation"): ...``). On a
    GPU each phase waits for its kernels before it stops the clock, so the figures add up."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def report(self, episodes: int, setup_s: float, loop_s: float) -> dict[str, float]:
        """Episodes per second of the update loop, and where its time went (``other``:
        metrics, checkpoints, the progress bar)."""
        phases = {f"{k}_s": v for k, v in self.seconds.items()}
        return {
            "episodes": episodes,
            "episodes_per_s": episodes / loop_s if loop_s else 0.0,
            "setup_s": setup_s,  # loading the models, the prompts, a checkpoint
            "loop_s": loop_s,
            **phases,
            "other_s": max(loop_s - sum(self.seconds.values()), 0.0),
        }


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)
