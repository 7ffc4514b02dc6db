"""Stage ``evaluate``: held-out evaluation that tells progress from reward hacking.

For the reward model, on held-out pairs: accuracy against the annotators' labels and, on the
demo, against the noise-free gold order. For the policy and the SFT model it starts from, on
held-out prompts: the reward model's mean score, KL(policy || SFT), mean length, distinct-2,
and a win rate against SFT judged by a judge the policy was not optimised against (the demo's
gold judge; ``heldout_rm``, the judge stage's reward model, trained on pairs the policy's reward
model never saw; or another reward model given by path: never the one PPO maximised).

Writes ``artifacts/evaluate/metrics.json`` (a flat JSON object), ``report.md`` with SFT and
policy generations side by side, every generation with its judge score in
``generations.jsonl``, and PNG plots: reward and KL over training, and reward-model scores of
chosen vs rejected held-out responses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_tasks import demo, reward, serving
from rlhf_tasks.config import HELDOUT_RM, EvaluateSection, ModelConfig, Params
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.locations import StageIO
from rlhf_tasks.models import load_tokenizer, model_kwargs
from rlhf_tasks.training import (
    read_jsonl,
    write_json,
)

# A policy may change mean length or distinct-2 by this share of SFT's before it counts as
# degenerate (unless the judge prefers it: then the change is what the judge wants).
MAX_STYLE_CHANGE = 0.2


def _chat(tokenizer: Any, prompt: str, response: str | None = None) -> str:
    messages = prompt_messages(prompt)
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=response is None, tokenize=False
    )


def generate(model: Any, tokenizer: Any, prompts: list[str], cfg: EvaluateSection) -> list[str]:
    """Sample one response per prompt, seeded: two models sample from the same random stream
    (``serving.generate``, the registered policy's own code path)."""
    conversations = [prompt_messages(p) for p in prompts]
    return serving.generate(model, tokenizer, conversations, serving.Sampling.of(cfg))


def sequence_kl(
    policy: Any, other: Any, tokenizer: Any, prompts: list[str], responses: list[str], temp: float
) -> float:
    """Mean over samples of sum_t (log p_policy - log p_other) on the policy's own samples."""
    import torch

    from rlhf_tasks.ppo import sequence_logprobs

    tokenizer.padding_side = "left"
    total = 0.0
    for prompt, response in zip(prompts, responses, strict=True):
        query = tokenizer(_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        full = tokenizer(_chat(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            a = sequence_logprobs(policy, ids, mask, len(query), temp)
            b = sequence_logprobs(other, ids, mask, len(query), temp)
        total += (a - b).sum().item()
    return total / max(len(prompts), 1)


def distinct_2(texts: list[str]) -> float:
    """Distinct bigrams over all bigrams of a set of responses (word level)."""
    bigrams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of samples where ``a`` scores higher than ``b`` (a tie counts half)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)


Judge = Callable[[list[str], list[str]], list[float]]


def judge_location(cfg: EvaluateSection, judge_model: str | Path | None) -> str | Path:
    """Where the configured reward-model judge is: the judge stage's model (``judge_model``)
    for ``heldout_rm``, else the path ``cfg.judge``."""
    if cfg.judge != HELDOUT_RM:
        return cfg.judge
    if judge_model is None or not Path(judge_model, "config.json").exists():
        raise ConfigError(
            f"evaluate.judge={HELDOUT_RM}: there is no judge model in {judge_model}: set "
            "judge.fraction (e.g. 0.2) so that the judge stage trains one, and run it"
        )
    return judge_model


def judge(
    cfg: EvaluateSection,
    model_cfg: ModelConfig | None = None,
    judge_model: str | Path | None = None,
) -> Judge:
    """The configured judge as ``scores = judge(prompts, responses)``: the demo's gold score,
    the judge stage's reward model (``heldout_rm``: ``judge_model``), or the reward model at the
    path ``cfg.judge``."""
    if cfg.judge == "gold":
        return lambda prompts, texts: [
            demo.gold_score(p, t) for p, t in zip(prompts, texts, strict=True)
        ]
    model, tokenizer = reward.load_reward_model(judge_location(cfg, judge_model), model_cfg)
    return lambda prompts, texts: reward.score(model, tokenizer, prompts, texts, cfg.batch_size)


def compare(
    cfg: EvaluateSection,
    models: dict[str, tuple[Any, Any]],
    prompts: str | Path,
    model_cfg: ModelConfig | None = None,
    judge_model: str | Path | None = None,
) -> dict[str, Any]:
    """Two models, ``{name: (model, tokenizer)}``, on the held-out prompts of ``prompts``: the
    same prompts, samples and random stream for each, scored by the configured judge (``judge``).
    Returns each one's mean judge score and the first one's win rate over the second."""
    rows = read_jsonl(Path(prompts), "evaluate")
    if cfg.judge == "gold":
        _check_demo_prompts([r["prompt"] for r in rows], Path(prompts))
    texts_in = [r["prompt"] for r in rows] * cfg.samples_per_prompt
    score = judge(cfg, model_cfg, judge_model)
    judged = {
        name: score(texts_in, generate(model.eval(), tokenizer, texts_in, cfg))
        for name, (model, tokenizer) in models.items()
    }
    first, second = judged.values()
    return {
        "scores": {name: sum(s) / len(s) for name, s in judged.items()},
        "win_rate": win_rate(first, second),
        "samples": len(texts_in),
    }


def run(params: Params, io: StageIO) -> dict[str, Any]:
    """The ``evaluate`` stage: the policy stage's model against the SFT model, on the validated
    held-out prompts and pairs."""
    return evaluate(
        params.evaluate,
        policy_dir=io.inputs["policy_model"],
        sft_dir=io.inputs["sft_model"],
        reward_dir=io.inputs["reward_model"],
        prompts=io.inputs["prompts_heldout"],
        pairs=io.inputs["preferences_heldout"],
        history=io.inputs["history"],
        out_dir=io.workdir,
        model_cfg=params.model,
        judge_model=io.inputs["judge_model"],
    )


def evaluate(
    cfg: EvaluateSection,
    *,
    policy_dir: str | Path,
    sft_dir: str | Path,
    reward_dir: str | Path,
    prompts: str | Path,
    pairs: str | Path,
    history: str | Path | None = None,
    out_dir: Path,
    model_cfg: ModelConfig | None = None,
    judge_model: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the model in ``policy_dir`` against the one in ``sft_dir``; write metrics.json,
    report.md and plots to ``out_dir``; return locations and metrics. ``judge_model``: the
    judge stage's model (for ``evaluate.judge: heldout_rm``)."""
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    remote = model_kwargs(model_cfg)  # remote code and pickled weights only if params allow
    tokenizer = load_tokenizer(str(sft_dir), remote["trust_remote_code"], "sft model")
    scorer, rm_tokenizer = reward.load_reward_model(reward_dir, model_cfg)
    metrics: dict[str, float] = {}

    # The reward model on held-out pairs: the annotators' labels, and the gold order.
    rows = read_jsonl(Path(pairs), "evaluate")
    prompts_p = [p["prompt"] for p in rows]
    chosen = reward.score(scorer, rm_tokenizer, prompts_p, [p["chosen"] for p in rows])
    rejected = reward.score(scorer, rm_tokenizer, prompts_p, [p["rejected"] for p in rows])
    metrics["reward_model/accuracy"] = sum(
        c > r for c, r in zip(chosen, rejected, strict=True)
    ) / len(rows)
    if cfg.judge == "gold":
        gold_chosen_better = [
            demo.gold_score(p["prompt"], p["chosen"]) > demo.gold_score(p["prompt"], p["rejected"])
            for p in rows
        ]
        metrics["reward_model/accuracy_gold"] = sum(
            (c > r) == g for c, r, g in zip(chosen, rejected, gold_chosen_better, strict=True)
        ) / len(rows)
        # The annotators' own agreement with the gold order: what a perfect reward model of
        # these labels would score on `accuracy`.
        metrics["reward_model/noise_ceiling"] = sum(gold_chosen_better) / len(rows)

    # Policy and SFT on held-out prompts, the same prompts and random stream for both.
    prompt_rows = read_jsonl(Path(prompts), "evaluate")
    if cfg.judge == "gold":
        _check_demo_prompts([r["prompt"] for r in prompt_rows], Path(prompts))
    texts_in = [r["prompt"] for r in prompt_rows] * cfg.samples_per_prompt
    models = {
        "sft": AutoModelForCausalLM.from_pretrained(sft_dir, **remote).eval(),
        "policy": AutoModelForCausalLM.from_pretrained(policy_dir, **remote).eval(),
    }
    generations = {name: generate(m, tokenizer, texts_in, cfg) for name, m in models.items()}
    score = judge(cfg, model_cfg, judge_model)
    judged: dict[str, list[float]] = {}
    for name, texts in generations.items():
        rm = reward.score(scorer, rm_tokenizer, texts_in, texts, cfg.batch_size)
        metrics[f"{name}/reward_mean"] = sum(rm) / len(rm)
        metrics[f"{name}/mean_length"] = sum(len(t.split()) for t in texts) / len(texts)
        metrics[f"{name}/distinct_2"] = distinct_2(texts)
        judged[name] = score(texts_in, texts)
        scope = "gold" if cfg.judge == "gold" else "judge"
        metrics[f"{scope}/{name}_score"] = sum(judged[name]) / len(texts)
        if cfg.judge == "gold":  # the demo policy's reward hack: one fact said twice
            repeats = sum(demo.repeats_a_fact(p, t) for p, t in zip(texts_in, texts, strict=True))
            metrics[f"gold/{name}_repeats_a_fact"] = repeats / len(texts)
    metrics["judge/win_rate_vs_sft"] = win_rate(judged["policy"], judged["sft"])
    if cfg.judge == "gold":
        metrics["gold/win_rate_vs_sft"] = metrics["judge/win_rate_vs_sft"]
    metrics["policy/kl_to_sft"] = sequence_kl(
        models["policy"], models["sft"], tokenizer, texts_in, generations["policy"], cfg.temperature
    )
    metrics.update(checks(metrics, cfg.kl_budget))

    metrics = {k: round(float(v), 6) for k, v in sorted(metrics.items())}
    write_json(out_dir / "metrics.json", metrics)
    _write_report(out_dir, cfg, metrics, texts_in, generations, judged)
    with (out_dir / "generations.jsonl").open("w", encoding="utf-8") as fh:
        for i, prompt in enumerate(texts_in):
            row = {"prompt": prompt}
            for name in ("sft", "policy"):
                row[name], row[f"{name}_judge_score"] = generations[name][i], judged[name][i]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    _plot(out_dir, history, chosen, rejected)
    return {
        "outputs": {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.md")},
        "metrics": metrics,
    }


def _check_demo_prompts(prompts: list[str], path: Path) -> None:
    """The gold judge knows the demo's topics only; on other prompts its scores mean nothing."""
    known = sum(demo.topic_of(p) is not None for p in prompts)
    if known < 0.9 * len(prompts):
        raise ConfigError(
            f"evaluate.judge=gold is the demo task's judge, but {len(prompts) - known} of the "
            f"{len(prompts)} prompts in {path} are not demo prompts; set evaluate.judge to the "
            "path of a reward model the policy was not trained against"
        )


def checks(metrics: dict[str, float], kl_budget: float) -> dict[str, float]:
    """Pass (1) or fail (0) of the policy's guard rails, as flat metrics:

    ``checks/kl_within_budget``: KL(policy || SFT) per response at most ``kl_budget`` nats;
    ``checks/no_degeneration``: mean length and distinct-2 each within ``MAX_STYLE_CHANGE`` of
    SFT's, unless the judge prefers the policy (win rate above 0.5): a change the judge rewards
    is what was asked for, not a collapse.
    """
    judge_prefers = metrics["judge/win_rate_vs_sft"] > 0.5
    within = all(
        abs(metrics[f"policy/{key}"] - metrics[f"sft/{key}"])
        <= MAX_STYLE_CHANGE * max(metrics[f"sft/{key}"], 1e-9)
        for key in ("mean_length", "distinct_2")
    )
    return {
        "checks/kl_within_budget": float(metrics["policy/kl_to_sft"] <= kl_budget),
        "checks/no_degeneration": float(within or judge_prefers),
    }


def _write_report(
    out_dir: Path,
    cfg: EvaluateSection,
    metrics: dict[str, float],
    prompts: list[str],
    generations: dict[str, list[str]],
    judged: dict[str, list[float]],
) -> None:
    lines = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.4g} |" for k, v in metrics.items()]
    judge = {"gold": "gold judge", HELDOUT_RM: "held-out judge (stage judge)"}.get(
        cfg.judge, f"judge `{cfg.judge}`"
    )
    lines += ["", f"## Generations on held-out prompts ({judge} score in brackets)", ""]
    lines += ["| prompt | SFT | policy |", "|---|---|---|"]
    for i in range(min(cfg.report_examples, len(prompts))):
        cells = [prompts[i]] + [
            f"{generations[n][i]} [{judged[n][i]:.2f}]" for n in ("sft", "policy")
        ]
        lines.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot(
    out_dir: Path, history: str | Path | None, chosen: list[float], rejected: list[float]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([chosen, rejected], bins=30, label=["chosen", "rejected"], alpha=0.7)
    ax.set(
        xlabel="reward-model score", ylabel="held-out pairs", title="Reward model on held-out pairs"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "reward_model_scores.png", dpi=100)
    plt.close(fig)
    rows = read_jsonl(Path(history), "evaluate") if history and Path(history).exists() else []
    rows = [r for r in rows if "objective/scores" in r]  # DPO logs no reward
    if rows:
        steps = [row["episode"] for row in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(steps, [r["objective/scores"] for r in rows], label="score")
        if "objective/rlhf_reward" in rows[0]:
            a.plot(steps, [r["objective/rlhf_reward"] for r in rows], label="score - KL penalty")
        a.set(xlabel="episode", title="Reward during training")
        a.legend()
        b.plot(steps, [r.get("objective/kl", float("nan")) for r in rows])
        b.set(xlabel="episode", title="KL(policy || SFT) during training")
        fig.tight_layout()
        fig.savefig(out_dir / "reward_kl.png", dpi=100)
        plt.close(fig)
