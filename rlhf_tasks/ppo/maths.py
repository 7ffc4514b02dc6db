"""The PPO maths: plain functions on tensors, each tested with hand-computed values in
``tests/code/test_ppo_math.py``.

Every tensor here is (B, T): B responses of T tokens (the tokens after the prompt), with a
``mask`` that is 1 on the tokens up to and including a response's first EOS and 0 after it.
Log-probabilities are natural logs of the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
