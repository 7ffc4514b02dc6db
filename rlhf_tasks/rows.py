"""What a training stage does with its rows: how many it read, kept, truncated into the response
and dropped, and why. Reported on the console and in the stage's metrics (so in ``metrics.json``
and MLflow); a stage that would lose more than ``<section>.max_dropped_fraction`` of its rows
(dropped, or truncated into the response) fails before it trains, naming the limit and the share.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_tasks.errors import DataError

if TYPE_CHECKING:
    from rlhf_tasks.config import Params


@dataclass(frozen=True)
class RowCounts:
    stage: str  # the metrics' prefix (sft, reward_model, policy, ...)
    section: str  # the params section that holds max_dropped_fraction
    read: int
    kept: int
    truncated: int = 0  # kept, but cut into the response
    limit: str = ""  # the setting that decides, e.g. "reward.args.max_length = 128 tokens"
    prompts_truncated: int = 0  # kept with the start of the prompt cut (not counted as lost)
    set_aside: int = 0  # read, and kept for another use on purpose (the judge's pairs)
    set_aside_for: str = ""  # what for, e.g. "the judge (judge.fraction = 0.2)"

    @property
    def used(self) -> int:
        """The rows this stage was to train on: those read, less those set aside."""
        return self.read - self.set_aside

    @property
    def dropped(self) -> int:
        return self.used - self.kept

    def metrics(self) -> dict[str, int]:
        return {
            f"{self.stage}/rows_read": self.read,
            f"{self.stage}/rows_set_aside": self.set_aside,
            f"{self.stage}/rows_kept": self.kept,
            f"{self.stage}/rows_truncated": self.truncated,
            f"{self.stage}/rows_dropped": self.dropped,
            f"{self.stage}/prompts_truncated": self.prompts_truncated,
        }

    def summary(self) -> str:
        changed = self.dropped or self.truncated or self.prompts_truncated
        why = f" by {self.limit}" if self.limit and changed else ""
        cut = f", {self.prompts_truncated} prompts cut" if self.prompts_truncated else ""
        aside = f"{self.set_aside} set aside for {self.set_aside_for}, " if self.set_aside else ""
        return (
            f"{self.stage}: trains on {self.kept} of {self.read} rows ({aside}{self.dropped} "
            f"dropped, {self.truncated} truncated into the response{cut}{why})"
        )

    def check(self, max_fraction: float) -> None:
        """Raise DataError when more than ``max_fraction`` of the rows to train on would be
        lost (rows set aside on purpose are not lost)."""
        if self.used <= 0:
            raise DataError(f"{self.stage}: no rows to train on ({self.summary()})")
        lost = self.dropped + self.truncated
        if lost / self.used > max_fraction:
            raise DataError(
                f"{self.stage}: {lost} of {self.used} rows ({lost / self.used:.1%}) would be "
                f"dropped ({self.dropped}) or truncated into the response ({self.truncated}) "
                f"by {self.limit or 'the trainer'}; at most {max_fraction:.0%} may be "
                f"({self.section}.max_dropped_fraction). Raise the limit, shorten or filter the "
                f"data, or raise {self.section}.max_dropped_fraction"
            )
        if self.kept == 0:
            raise DataError(f"{self.stage}: no rows left to train on ({self.summary()})")


def over(lengths: Iterable[int], limit: int | None) -> int:
    """How many of ``lengths`` exceed ``limit`` (None: no limit)."""
    return 0 if limit is None else sum(length > limit for length in lengths)


@dataclass(frozen=True)
class TokenLimit:
    """The length limit a data set meets where it is used: its tokens (chat template applied),
    the share of rows that may exceed it, and the setting that sets it (for messages)."""

    tokens: int
    allowed: float  # share of rows that may be over the limit (dropped or cut by the stage)
    setting: str


def token_limit(params: Params, kind: str, heldout: bool, model_max: int) -> TokenLimit:
    """The limit the validation gate's ``length_tokens`` check applies to a data set of ``kind``:
    the one the stage that reads it applies (this is the one place that says which), so that
    data the gate passes trains as promised. ``validate.max_tokens``, when set, is the limit of
    every data set, with no row allowed over it."""
    cfg = params.validate_config
    if cfg.max_tokens is not None:
        return TokenLimit(cfg.max_tokens, 0.0, "validate.max_tokens")
    if heldout:  # evaluated, scored and generated from: nothing may be over the model's length
        return TokenLimit(model_max, 0.0, "the model's max length")
    if kind == "preferences":
        # The reward model trains on them; under DPO the policy does too: the stricter applies.
        readers = [("reward", params.reward)]
        if params.policy.algorithm == "dpo":
            readers.append(("dpo", params.dpo))
        section, strictest = min(readers, key=lambda r: r[1].args.get("max_length") or model_max)
        return TokenLimit(
            strictest.args.get("max_length") or model_max,
            min(c.max_dropped_fraction for _, c in readers),
            f"{section}.args.max_length",
        )
    if kind == "sft":
        tokens = params.sft.args.get("max_length") or model_max
        return TokenLimit(tokens, params.sft.max_dropped_fraction, "sft.args.max_length")
    ppo = params.ppo
    allowed = 1.0 if ppo.truncate_prompts == "left" else ppo.max_dropped_fraction  # cut, kept
    if ppo.max_prompt_length is not None:
        return TokenLimit(ppo.max_prompt_length, allowed, "ppo.max_prompt_length")
    tokens = max(1, model_max - ppo.response_length)
    return TokenLimit(tokens, allowed, "the model's max length - ppo.response_length")
