"""Our PPO trainer on the tiny demo model: outputs, metrics, the first-minibatch invariants and
exact resumption from a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_tasks.config import LoraSection, PpoSection
from rlhf_tasks.ppo import train

TRL_METRICS = (
    "objective/kl",
    "objective/scores",
    "objective/rlhf_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/ratio",
)


@pytest.fixture(scope="module")
def reward_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model with the base model's body and a fresh scalar head (untrained)."""
    out = tmp_path_factory.mktemp("reward")
    model = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out)
    return out


@pytest.fixture
def config() -> PpoSection:
    return PpoSection(
        total_episodes=48,
        rollout_batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        response_length=12,
        save_every=2,
        keep_checkpoints=10,
        target_kl=0.01,  # adaptive: the controller's state must survive a resume too
        kl_horizon=100,
    )


@pytest.fixture
def run(base_model_dir: Path, reward_dir: Path, demo_root: Path):
    """``run(cfg, out_dir, run_id="a")``: PPO from the base model against the untrained reward
    model, on the demo's RL prompts."""

    def _run(cfg: PpoSection, out_dir: Path, run_id: str = "a") -> dict:
        return train(
            cfg,
            policy=base_model_dir,
            reward_model=reward_dir,
            prompts=demo_root / "data/prompts/rl.jsonl",
            out_dir=out_dir,
            run_id=run_id,
        )

    return _run


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_ppo_writes_a_policy_and_trl_named_metrics(
    config: PpoSection, run, base_model_dir: Path, tmp_path: Path
) -> None:
    result = run(config, tmp_path)

    model = AutoModelForCausalLM.from_pretrained(result["outputs"]["model"])
    assert model.config.num_hidden_layers == 2
    history = _history(tmp_path)
    assert [row["update"] for row in history] == list(range(1, 7))
    assert history[-1]["episode"] == 48
    for key in TRL_METRICS:
        assert key in result["metrics"], key
    assert json.loads((tmp_path / "metrics.json").read_text()) == result["metrics"]
    # The policy is updated from the weights that sampled the rollout, so the first minibatch of
    # every update sees ratio 1 and approximate KL 0.
    for row in history:
        assert row["val/ratio_first"] == pytest.approx(1.0, abs=1e-6)
        assert row["val/approxkl_first"] == pytest.approx(0.0, abs=1e-9)
    # Training moved the policy away from where it started.
    start = load_file(str(base_model_dir / "model.safetensors"))
    end = load_file(str(Path(result["outputs"]["model"]) / "model.safetensors"))
    assert any(not (start[k] == end[k]).all() for k in start)


def test_resumed_run_makes_the_same_updates_as_an_uninterrupted_one(
    config: PpoSection, run, tmp_path: Path
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(config, whole)
    # A run killed after its checkpoint at update 2: only that checkpoint survives.
    shutil.copytree(whole / "checkpoints/update-2", resumed / "checkpoints/update-2")
    shutil.copy(whole / "checkpoints/run_id", resumed / "checkpoints/run_id")
    result = run(config, resumed)

    assert result["resumed_from_update"] == 2
    assert _history(resumed) == _history(whole)
    a = load_file(str(whole / "model/model.safetensors"))
    b = load_file(str(resumed / "model/model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_half_written_checkpoints_are_ignored(config: PpoSection, run, tmp_path: Path) -> None:
    (tmp_path / "checkpoints/update-4.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints/update-4.tmp/state.pt").write_bytes(b"")  # killed before the rename
    (tmp_path / "checkpoints/update-6").mkdir()  # no state.pt: killed while writing
    (tmp_path / "checkpoints/run_id").write_text("a\n")
    result = run(config, tmp_path)
    assert result["resumed_from_update"] == 0
    assert [row["update"] for row in _history(tmp_path)] == list(range(1, 7))


def test_checkpoints_of_another_run_are_not_resumed(config: PpoSection, run, tmp_path: Path):
    """Checkpoints of a run with other params or inputs (another run id) are discarded."""
    run(config, tmp_path, run_id="a")
    assert (tmp_path / "checkpoints/update-6").exists()
    result = run(config, tmp_path, run_id="b")
    assert result["resumed_from_update"] == 0
    assert (tmp_path / "checkpoints/run_id").read_text().strip() == "b"
    # The same run id again: everything was done, nothing is trained twice.
    before = _history(tmp_path)
    again = run(config, tmp_path, run_id="b")
    assert again["resumed_from_update"] == 6
    assert _history(tmp_path) == before


def test_lora_policy_uses_the_adapterless_model_as_reference(
    config: PpoSection, run, base_model_dir: Path, tmp_path: Path
) -> None:
    """With LoRA there is no second copy of the policy: the reference is the policy with its
    adapter disabled, so the first update's KL is 0 (LoRA's B matrices start at zero), and the
    saved policy is a plain model with the adapter merged."""
    cfg = config.model_copy(
        update={"lora": LoraSection(enabled=True, r=4, alpha=8), "learning_rate": 1e-2}
    )
    result = run(cfg, tmp_path)

    history = _history(tmp_path)
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["objective/kl"] != pytest.approx(0.0, abs=1e-6)
    model_dir = Path(result["outputs"]["model"])
    assert not (model_dir / "adapter_config.json").exists()
    start = load_file(str(base_model_dir / "model.safetensors"))
    end = load_file(str(model_dir / "model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not (start[k] == end[k]).all() for k in start)


# -- real checkpoints, and the wiring of the rollout ------------------------------------------


@pytest.fixture(scope="module")
def bf16_checkpoint(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base model as hub checkpoints ship: bf16 safetensors, attention dropout on, and a
    generation config with sampling settings of its own."""
    import torch
    from transformers import GenerationConfig

    out = tmp_path_factory.mktemp("bf16")
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, attention_dropout=0.3)
    model.to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(repetition_penalty=1.5, top_p=0.5, do_sample=True).save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out)
    return out


def test_a_bf16_checkpoint_trains_in_fp32_without_dropout_or_weight_decay(
    bf16_checkpoint: Path, reward_dir: Path
) -> None:
    import torch

    from rlhf_tasks.ppo.trainer import _setup

    assert json.loads((bf16_checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    run = _setup(PpoSection(), bf16_checkpoint, reward_dir, None, None)
    models = run.models
    for model in (models.policy, models.ref_policy, models.scorer, models.critic):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert models.policy.config.attention_dropout == 0.0
    assert all(
        m.attention_dropout == 0.0
        for m in models.policy.modules()
        if hasattr(m, "attention_dropout")
    )
    for optimiser in (run.state.policy_opt, run.state.value_opt):
        assert {g["weight_decay"] for g in optimiser.param_groups} == {0.0}
    decayed = _setup(PpoSection(weight_decay=0.1), bf16_checkpoint, reward_dir, None, None)
    groups = decayed.state.policy_opt.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"])  # no norm or bias is decayed
    assert groups[1]["params"] and all(p.ndim == 1 for p in groups[1]["params"])


def test_sampling_ignores_the_checkpoints_generation_config(bf16_checkpoint: Path) -> None:
    from rlhf_tasks.ppo.rollout import generation_config

    own = json.loads((bf16_checkpoint / "generation_config.json").read_text())
    assert own["repetition_penalty"] == 1.5
    config = generation_config(PpoSection(temperature=0.7, response_length=12), 1, 2)
    assert (config.repetition_penalty, config.top_p, config.top_k, config.temperature) == (
        1.0,
        1.0,
        0,
        0.7,
    )
    assert (config.max_new_tokens, config.min_new_tokens, config.do_sample) == (12, 0, True)


def test_sequence_logprobs_are_a_log_softmax_at_the_temperature(base_model_dir: Path) -> None:
    import torch

    from rlhf_tasks.ppo.rollout import sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (2, 9))
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # the second prompt is left-padded
    context_len, temp = 4, 0.7
    got = sequence_logprobs(model, ids, attention, context_len, temp)

    with torch.no_grad():
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits
    naive = torch.log_softmax(logits / temp, dim=-1)
    # Position t predicts token t + 1: the response tokens context_len ... end.
    expected = naive[:, context_len - 1 : -1].gather(2, ids[:, context_len:, None]).squeeze(-1)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_rollout_takes_each_log_prob_from_its_own_model(
    base_model_dir: Path, reward_dir: Path, demo_root: Path
) -> None:
    """Policy and reference differ here: the rollout's log-probs are the policy's, the
    reference's the reference's, and the KL is their difference (not the other way round)."""
    import contextlib

    import torch

    from rlhf_tasks.ppo.rollout import load_prompts, rollout, sequence_logprobs
    from rlhf_tasks.ppo.trainer import _setup

    cfg = PpoSection(rollout_batch_size=4, mini_batch_size=4, response_length=8)
    run = _setup(cfg, base_model_dir, reward_dir, None, None)
    models = run.models
    with torch.no_grad():
        for p in models.ref_policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, _ = load_prompts(demo_root / "data/prompts/rl.jsonl", models.tokenizer, cfg)
    torch.manual_seed(0)
    batch = rollout(models, prompts[:4], cfg, 0.1, lambda _: contextlib.nullcontext())

    with torch.no_grad():
        args = (batch.sequences, batch.attention, batch.context_len, cfg.temperature)
        policy = sequence_logprobs(models.policy, *args) * batch.mask
        reference = sequence_logprobs(models.ref_policy, *args) * batch.mask
    torch.testing.assert_close(batch.logprobs, policy)
    torch.testing.assert_close(batch.ref_logprobs, reference)
    assert not torch.allclose(policy, reference)
    torch.testing.assert_close(batch.kl, (policy - reference) * batch.mask)


def test_passes_over_the_real_columns_equal_the_padded_passes(
    base_model_dir: Path, reward_dir: Path
) -> None:
    """The scoring and optimisation passes leave out the columns that are padding in every row
    (``Columns``): the log-probs and values of the real tokens are those of the whole padded
    batch, and 0 after each response's end."""
    import torch

    from rlhf_tasks.ppo.rollout import (
        Columns,
        ValueModel,
        response_logprobs,
        response_values,
        sequence_logprobs,
        token_scores,
    )

    policy = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    critic = ValueModel(
        AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1).eval()
    )
    torch.manual_seed(0)
    context_len, length = 7, 9
    ids = torch.randint(5, 200, (3, context_len + length))
    prompt_pad, response_len = (2, 3, 5), (4, 6, 1)  # every row pads 2+ prompt columns
    mask = torch.tensor([[1] * n + [0] * (length - n) for n in response_len])
    attention = torch.cat([torch.ones(3, context_len, dtype=torch.long), mask], dim=1)
    for row, pad in enumerate(prompt_pad):
        attention[row, :pad] = 0
    cols = Columns.of(attention, mask, context_len)
    assert (cols.start, cols.width) == (2, 6)  # the padded batch is 7 + 9 wide; these 5 + 6

    with torch.no_grad():
        padded_logprobs = sequence_logprobs(policy, ids, attention, context_len, 0.7)
        padded_values = token_scores(critic.model, ids, attention)[:, context_len - 1 : -1]
        logprobs = response_logprobs(policy, ids, attention, cols, 0.7)
        values = response_values(critic, ids, attention, cols)
    assert logprobs.shape == values.shape == mask.shape
    torch.testing.assert_close(logprobs, padded_logprobs * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, padded_values * mask, atol=1e-5, rtol=1e-5)
    assert (logprobs[mask == 1] != 0).all() and (values[mask == 0] == 0).all()


def test_micro_batches_accumulate_the_gradient_of_the_whole_minibatch(
    base_model_dir: Path, reward_dir: Path, demo_root: Path
) -> None:
    import contextlib

    import torch

    from rlhf_tasks.ppo.rollout import load_prompts, rollout
    from rlhf_tasks.ppo.trainer import _setup, ppo_epochs

    cfg = PpoSection(rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, response_length=8)
    run = _setup(cfg, base_model_dir, reward_dir, None, None)
    prompts, _ = load_prompts(demo_root / "data/prompts/rl.jsonl", run.models.tokenizer, cfg)
    torch.manual_seed(0)
    batch = rollout(run.models, prompts[:4], cfg, 0.1, lambda _: contextlib.nullcontext())
    critic = list(run.models.critic.parameters())

    def gradients(micro: int | None) -> tuple[list[torch.Tensor], dict]:
        """The clipped gradients of the one minibatch step (the step itself left out, so that
        both runs start from the same weights), and the step's statistics."""
        seen: list[torch.Tensor] = []
        run.state.policy_opt.step = lambda: seen.extend(p.grad.clone() for p in run.trainable)
        run.state.value_opt.step = lambda: seen.extend(p.grad.clone() for p in critic)
        torch.manual_seed(1)
        stats = ppo_epochs(run, batch, cfg.model_copy(update={"micro_batch_size": micro}))
        return seen, stats

    whole, whole_stats = gradients(None)
    parts, parts_stats = gradients(1)  # four micro-batches of one episode each
    assert len(whole) == len(parts) > 0
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for key, values in whole_stats.items():
        assert parts_stats[key] == pytest.approx(values, rel=1e-5, abs=1e-7), key


def test_the_score_is_read_after_the_templates_end_of_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a template that writes tokens after the EOS (ChatML: "<|im_end|>\\n"), a response
    that ended with EOS is scored at the last of those tokens, as ``reward.score`` scores the
    rendered chat; one that never ended is scored at its last real token."""
    import torch

    from rlhf_tasks.ppo import rollout
    from rlhf_tasks.ppo.rollout import Models, score_responses

    newline, eos, pad = 7, 2, 0
    seen: dict[str, torch.Tensor] = {}

    def fake_scores(_model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Each position's score says which token it holds and where: id * 100 + position."""
        seen["ids"], seen["attention"] = ids, attention
        return ids.float() * 100 + torch.arange(ids.shape[1]).float()

    monkeypatch.setattr(rollout, "token_scores", fake_scores)
    tokenizer = type("Tok", (), {"pad_token_id": pad})()
    sequences = torch.tensor([[5, 6, 9, eos, pad], [5, 6, 9, 9, 9]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    last, has_eos = torch.tensor([3, 4]), torch.tensor([True, False])
    models = Models(None, None, None, "scorer", None, tokenizer, end_of_turn=[newline])

    scores = score_responses(models, sequences, attention, last, has_eos)

    assert scores.tolist() == [newline * 100 + 4, 9 * 100 + 4]
    assert seen["ids"][0].tolist()[:5] == [5, 6, 9, eos, newline]
    assert seen["attention"][0].tolist()[:5] == [1, 1, 1, 1, 1]
    assert seen["attention"][1].tolist() == [1, 1, 1, 1, 1, 0]  # nothing appended: no EOS
    # Without an end of turn (the template ends the turn with the EOS) the EOS itself is read.
    plain = Models(None, None, None, "scorer", None, tokenizer)
    assert score_responses(plain, sequences, attention, last, has_eos).tolist() == [
        eos * 100 + 3,
        9 * 100 + 4,
    ]


def test_a_toy_reward_rises_over_a_few_updates(
    base_model_dir: Path, reward_dir: Path, demo_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """The wiring end to end: with a reward that is the share of even token ids in the
    response, PPO's updates raise the score it is given (a sign error, swapped log-probs or a
    broken advantage anywhere would leave it flat or lower it)."""
    from rlhf_tasks.ppo import rollout

    cfg = PpoSection(
        total_episodes=32 * 12,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        response_length=8,
        learning_rate=1e-2,
        value_learning_rate=1e-2,
        kl_coef=0.01,
        save_every=100,
    )

    def even_share(_models, sequences, attention, last, _has_eos):
        context_len = sequences.shape[1] - cfg.response_length
        response = sequences[:, context_len:]
        real = attention[:, context_len:].float()
        return 4 * (((response % 2) == 0).float() * real).sum(1) / real.sum(1).clamp(min=1)

    monkeypatch.setattr(rollout, "score_responses", even_share)
    train(
        cfg,
        policy=base_model_dir,
        reward_model=reward_dir,
        prompts=demo_root / "data/prompts/rl.jsonl",
        out_dir=tmp_path,
        run_id="toy",
    )
    scores = [row["objective/scores"] for row in _history(tmp_path)]
    assert len(scores) == 12
    first, final = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert final > first + 1.0, scores  # measured: about 1.2 -> 2.9 of 4
