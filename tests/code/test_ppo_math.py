"""The PPO maths of rlhf_tasks/ppo/maths.py against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_tasks.ppo import (
    KLController,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    token_rewards,
    truncate_after_eos,
    value_loss,
)

EOS, PAD = 2, 0


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype))


# -- masking after EOS ------------------------------------------------------------------------


def test_mask_keeps_tokens_up_to_and_including_the_first_eos() -> None:
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert response_mask(responses, EOS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_truncation_pads_everything_after_the_first_eos() -> None:
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    truncated, mask = truncate_after_eos(responses, EOS, PAD)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


# -- masked statistics and whitening ----------------------------------------------------------


def test_masked_statistics_ignore_masked_entries() -> None:
    x, mask = t([1, 2, 3, 100]), t([1, 1, 1, 0])
    close(masked_mean(x, mask), 2.0)
    close(masked_var(x, mask), 1.0)  # unbiased: ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)


def test_whitening_gives_zero_mean_unit_variance_on_real_tokens() -> None:
    x, mask = t([1, 2, 3, 100]), t([1, 1, 1, 0])
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


# -- per-token KL penalty ---------------------------------------------------------------------


def test_token_rewards_penalise_kl_and_add_the_score_on_the_last_real_token() -> None:
    scores = torch.tensor([1.0, -2.0], dtype=torch.float64)
    logprobs = t([-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0])
    ref = t([-1.5, -2.0, -2.0], [-2.0, -1.0, -0.5])
    mask = t([1, 1, 0], [1, 1, 1])
    rewards, kl = token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # row 0: kl = [0.5, 0, masked]; score 1.0 lands on token 1 (the last real one)
    # row 1: kl = [1.0, 0, -0.5]; score -2.0 lands on token 2
    close(kl, [[0.5, 0.0, 0.0], [1.0, 0.0, -0.5]])
    close(rewards, [[-0.05, 1.0, 0.0], [-0.1, 0.0, 0.05 - 2.0]])


# -- GAE --------------------------------------------------------------------------------------


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards, values, mask = t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.4, 0.3]])
    close(returns, [[1.0, 1.0, 1.0]])


def test_gae_discounts_by_gamma_and_lambda() -> None:
    rewards, values, mask = t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta2 = 1 - 0.7 = 0.3; delta1 = 0.9 * 0.7 - 0.6 = 0.03; delta0 = 0.9 * 0.6 - 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.45 * 0.3 = 0.165; A0 = 0.04 + 0.45 * 0.165 = 0.11425
    close(advantages, [[0.11425, 0.165, 0.3]])
    close(returns, [[0.61425, 0.765, 1.0]])


def test_gae_treats_values_after_the_last_real_token_as_zero() -> None:
    rewards, values, mask = t([0, 1, 0]), t([0.5, 0.6, 9.9]), t([1, 1, 0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # delta1 = 1 + 0 - 0.6 = 0.4 (no bootstrap from the padded 9.9); delta0 = 0.6 - 0.5 = 0.1
    close(advantages, [[0.5, 0.4, 0.0]])
    close(returns, [[1.0, 1.0, 0.0]])


# -- clipped losses ---------------------------------------------------------------------------


def test_policy_loss_on_unchanged_policy_has_ratio_one_and_zero_approx_kl() -> None:
    logp, adv, mask = t([-1.0, -2.0, -0.5]), t([0.5, -1.0, 2.0]), t([1, 1, 0])
    out = policy_loss(logp.clone(), logp, adv, mask, clip_range=0.2)
    close(out.ratio, 1.0)
    close(out.approxkl, 0.0)
    close(out.clipfrac, 0.0)
    close(out.loss, -(0.5 - 1.0) / 2)  # -mean(A) over the two real tokens


@pytest.mark.parametrize(
    ("advantage", "loss", "clipfrac"),
    [
        (1.0, -1.2, 1.0),  # ratio 1.5 > 1 + 0.2 with A > 0: the clipped term (-1.2) wins
        (-1.0, 1.5, 0.0),  # with A < 0 the unclipped term (1.5) is the larger: no clipping
    ],
)
def test_policy_loss_clips_the_ratio(advantage: float, loss: float, clipfrac: float) -> None:
    new, old = t([math.log(1.5)]), t([0.0])
    out = policy_loss(new, old, t([advantage]), t([1]), clip_range=0.2)
    close(out.loss, loss)
    close(out.clipfrac, clipfrac)
    close(out.ratio, 1.5)
    close(out.approxkl, 0.5 * math.log(1.5) ** 2)


@pytest.mark.parametrize(
    ("advantage", "loss", "clipfrac"),
    [
        (-1.0, 0.8, 1.0),  # ratio 0.5 < 1 - 0.2 with A < 0: the clipped term (0.8) wins
        (1.0, -0.5, 0.0),  # with A > 0 the unclipped term (-0.5) is the larger: no clipping
    ],
)
def test_policy_loss_clips_a_ratio_below_one_minus_epsilon(
    advantage: float, loss: float, clipfrac: float
) -> None:
    new, old = t([math.log(0.5)]), t([0.0])
    out = policy_loss(new, old, t([advantage]), t([1]), clip_range=0.2)
    close(out.loss, loss)
    close(out.clipfrac, clipfrac)
    close(out.ratio, 0.5)


def test_value_clipping_is_around_the_old_value_not_zero() -> None:
    old, mask = t([3.0, 3.0]), t([1, 1])
    new, returns = t([4.0, 2.5]), t([5.0, 2.0])
    loss, clipfrac = value_loss(new, old, returns, mask, clip_range=0.2)
    # token 0: V_clip = 3.2; (4 - 5)^2 = 1 < (3.2 - 5)^2 = 3.24 -> 3.24, clipped
    # token 1: V_clip = 2.8; (2.5 - 2)^2 = 0.25 < (2.8 - 2)^2 = 0.64 -> 0.64, clipped
    close(loss, 0.5 * (3.24 + 0.64) / 2)
    close(clipfrac, 1.0)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_errors() -> None:
    old, mask = t([0.0, 0.0]), t([1, 1])
    new, returns = t([1.0, 1.0]), t([0.5, 2.0])
    loss, clipfrac = value_loss(new, old, returns, mask, clip_range=0.2)
    # token 0: V_clip = 0.2; (1 - 0.5)^2 = 0.25 > (0.2 - 0.5)^2 = 0.09 -> 0.25, not clipped
    # token 1: (1 - 2)^2 = 1.0 < (0.2 - 2)^2 = 3.24 -> 3.24, clipped
    close(loss, 0.5 * (0.25 + 3.24) / 2)
    close(clipfrac, 0.5)


# -- KL controller ----------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_towards_the_target_by_at_most_20_percent() -> None:
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over target: the error is clipped to +0.2; 64 episodes of a 10,000 horizon
    assert ctl.update(current_kl=9.0, n_steps=64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    ctl = KLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(current_kl=5.4, n_steps=100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_fixed_kl_controller_never_changes_and_state_round_trips() -> None:
    ctl = KLController(0.05)
    assert ctl.update(current_kl=100.0, n_steps=1000) == 0.05
    adaptive = KLController(0.1, target=6.0, horizon=500)
    adaptive.update(9.0, 64)
    restored = KLController(1.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.state_dict() == adaptive.state_dict()
