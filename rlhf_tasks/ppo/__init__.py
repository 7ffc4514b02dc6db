"""Stage ``ppo``: our own PPO for language models (TRL removed its PPO trainer in 1.13).

The algorithm is the InstructGPT form (Ouyang et al., 2022; Ziegler et al., 2019, "Fine-Tuning
Language Models from Human Preferences"), with the details of "The N Implementation Details of
RLHF with PPO" (Huang et al., 2024) that TRL's PPOTrainer used:

- responses are cut after their first EOS; every tensor below carries a ``mask`` of shape
  (batch, response_len) that is 1 on response tokens up to and including that EOS, 0 after;
- per-token reward ``r_t = -kl_coef * (logp_t - ref_logp_t)``, plus the reward model's score on
  the last real token;
- advantages by GAE over the response tokens, whitened over the batch's real tokens;
- clipped policy loss and clipped value loss, means over real tokens;
- a fixed or adaptive KL coefficient (Ziegler et al., section 2.2).

The package, in the order an update uses it:

- ``maths``: the PPO maths as plain functions on tensors, each tested with hand-computed values
  in ``tests/code/test_ppo_math.py``;
- ``rollout``: the forward passes (log-probs of sampled tokens, reward and value heads), the
  prompts, and ``rollout``, which samples one update's responses, scores them and computes their
  rewards and advantages (a ``Rollout``);
- ``trainer``: ``train``, the loop of updates: setup, rollout, PPO epochs, metrics, outputs;
- ``checkpoint``: checkpoints that resume exactly.

Shapes: B = batch size, T = response length (tokens after the prompt). Log-probabilities are
natural logs of the sampled tokens, shape (B, T).
"""

from rlhf_tasks.ppo.maths import (
    KLController,
    PolicyLoss,
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
from rlhf_tasks.ppo.rollout import (
    Rollout,
    ValueModel,
    end_of_turn,
    load_prompts,
    sequence_logprobs,
    token_scores,
)
from rlhf_tasks.ppo.trainer import PhaseClock, train

# The function ``rollout.rollout`` is not re-exported: ``rlhf_tasks.ppo.rollout`` stays the module.
__all__ = [
    "KLController",
    "PhaseClock",
    "PolicyLoss",
    "Rollout",
    "ValueModel",
    "end_of_turn",
    "gae",
    "load_prompts",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "response_mask",
    "sequence_logprobs",
    "token_rewards",
    "token_scores",
    "train",
    "truncate_after_eos",
    "value_loss",
]
