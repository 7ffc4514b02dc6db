"""No silent data loss: each training stage counts the rows it read, kept, truncated into the
response and dropped, and fails before training when it would lose more than
``<section>.max_dropped_fraction`` of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_tasks import sft
from rlhf_tasks.config import PpoSection, load_params
from rlhf_tasks.errors import DataError
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.models import load_tokenizer
from rlhf_tasks.ppo import load_prompts
from rlhf_tasks.rows import RowCounts
from rlhf_tasks.stages import STAGES, call
from rlhf_tasks.training import read_jsonl


def test_the_limit_is_a_share_of_the_rows_read():
    at_limit = RowCounts("reward_model", "reward", read=100, kept=97, truncated=2, limit="L")
    at_limit.check(0.05)  # 5 of 100 lost: allowed
    assert at_limit.metrics() == {
        "reward_model/rows_read": 100,
        "reward_model/rows_set_aside": 0,
        "reward_model/rows_kept": 97,
        "reward_model/rows_truncated": 2,
        "reward_model/rows_dropped": 3,
        "reward_model/prompts_truncated": 0,
    }

    over = RowCounts("reward_model", "reward", read=100, kept=94, truncated=0, limit="L = 8 tokens")
    with pytest.raises(DataError) as caught:
        over.check(0.05)
    assert str(caught.value) == (
        "reward_model: 6 of 100 rows (6.0%) would be dropped (6) or truncated into the response "
        "(0) by L = 8 tokens; at most 5% may be (reward.max_dropped_fraction). Raise the limit, "
        "shorten or filter the data, or raise reward.max_dropped_fraction"
    )
    with pytest.raises(DataError, match="no rows left to train on"):
        RowCounts("sft", "sft", read=3, kept=0).check(1.0)
    with pytest.raises(DataError, match="no rows to train on"):
        RowCounts("sft", "sft", read=0, kept=0).check(1.0)


def test_rows_set_aside_for_the_judge_are_counted_but_not_lost():
    counts = RowCounts(
        "reward_model", "reward", read=100, kept=76, set_aside=20, set_aside_for="the judge"
    )
    counts.check(0.05)  # 4 of the 80 it was to train on: allowed
    assert counts.dropped == 4
    assert counts.summary() == (
        "reward_model: trains on 76 of 100 rows (20 set aside for the judge, 4 dropped, "
        "0 truncated into the response)"
    )
    with pytest.raises(DataError, match=r"5 of 80 rows \(6.2%\)"):
        RowCounts("reward_model", "reward", read=100, kept=75, set_aside=20).check(0.05)


@pytest.mark.slow
def test_reward_fails_before_training_when_max_length_drops_the_pairs(project: Path, validated):
    validated(pairs=64, heldout=16)
    params = load_params(
        "params.yaml",
        ["reward.init_from=base", "reward.args.max_length=24", "reward.args.max_steps=1"],
    )

    with pytest.raises(
        DataError, match=r"reward_model: \d+ of 64 rows .* by reward.args.max_length = 24 tokens"
    ):
        call("reward", params)

    assert not (project / "artifacts/reward/model").exists()
    assert not list((project / "artifacts/reward").glob("checkpoints/checkpoint-*"))


@pytest.mark.slow
def test_sft_counts_rows_truncated_into_the_completion(project: Path, validated):
    validated(sft=32)
    rows = read_jsonl(STAGES["sft"].io().inputs["sft_train"], "sft")
    unlimited = sft.build_trainer(load_params("params.yaml"), STAGES["sft"].io(), rows)
    tokenizer = unlimited.processing_class
    prompts = [len(ids(tokenizer, prompt_messages(r["prompt"]), True)) for r in rows]
    full = [len(ids(tokenizer, [*prompt_messages(r["prompt"]), assistant(r)])) for r in rows]
    # Every prompt fits, some completions do not: those are truncated, none is dropped.
    limit = sorted(full)[16]
    assert max(prompts) < limit
    params = load_params("params.yaml", [f"sft.args.max_length={limit}"])

    counts = sft.row_counts(sft.build_trainer(params, STAGES["sft"].io(), rows), rows)

    truncated = sum(n > limit for n in full)
    assert 0 < truncated < 32
    assert (counts.read, counts.kept, counts.truncated) == (32, 32, truncated)
    with pytest.raises(DataError, match=f"max_length = {limit} tokens"):
        counts.check(params.sft.max_dropped_fraction)
    everything = sft.row_counts(unlimited, rows)
    assert (everything.kept, everything.truncated, everything.dropped) == (32, 0, 0)

    # A limit shorter than the prompts leaves nothing to learn from: SFTTrainer drops the rows.
    short = load_params("params.yaml", [f"sft.args.max_length={min(prompts) - 1}"])
    dropped = sft.row_counts(sft.build_trainer(short, STAGES["sft"].io(), rows), rows)
    assert (dropped.kept, dropped.dropped, dropped.truncated) == (0, 32, 0)


def ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, return_dict=True
    )
    return encoded["input_ids"]


def assistant(row: dict) -> dict:
    return {"role": "assistant", "content": row["completion"]}


@pytest.mark.slow
def test_ppo_drops_or_left_truncates_prompts_over_its_limit(tmp_path: Path, base_model_dir: Path):
    tokenizer = load_tokenizer(str(base_model_dir), False, "model")
    path = tmp_path / "prompts.jsonl"
    short, long = "Tell me about dogs.", "Tell me about dogs and cats. " * 6
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (short, long, short)))
    short_ids = ids(tokenizer, [{"role": "user", "content": short}], True)
    limit = len(short_ids) + 2

    kept, counts = load_prompts(path, tokenizer, PpoSection(max_prompt_length=limit))
    assert len(kept) == 2 and (counts.read, counts.dropped) == (3, 1)
    assert f"ppo.max_prompt_length = {limit} prompt tokens" in counts.summary()
    with pytest.raises(DataError, match=r"1 of 3 rows \(33.3%\) would be dropped"):
        counts.check(0.05)

    cut, counts = load_prompts(
        path, tokenizer, PpoSection(max_prompt_length=limit, truncate_prompts="left")
    )
    assert [len(row) for row in cut] == [len(short_ids), limit, len(short_ids)]
    # The end of the prompt (the turn to answer and the generation prompt) is what is kept.
    assert cut[1][-4:] == ids(tokenizer, [{"role": "user", "content": long}], True)[-4:]
    assert (counts.dropped, counts.prompts_truncated) == (0, 1)
    counts.check(0.05)

    # With no limit set, the model's max length less the response's is the limit.
    _, default = load_prompts(path, tokenizer, PpoSection(response_length=40))
    assert (
        f"the model's max length = {tokenizer.model_max_length - 40} prompt tokens" in default.limit
    )
